"""The Lua scripts with which Redis numbers a topic's messages and keeps its history.

Each runs atomically in Redis: an append reads (or starts) the topic's epoch, takes the next
offset, keeps the payload and publishes it in one step, so two workers appending to one topic
can never be given the same offset or deliver in another order than they were numbered.

A topic's keys share one hash slot (the ``{…}`` hash tag of Redis Cluster), so that a script
may touch both:

- ``trio-fanout:{HEX}:meta``: a hash, ``e`` the epoch and ``o`` the latest offset, and ``s``
  and ``t`` the topic's retention (size, and ttl in ms) where a cluster's worker recorded it;
- ``trio-fanout:{HEX}:stream``: a stream of the kept payloads (field ``p``), entry ids
  ``OFFSET-0``, capped at the retention's size.

HEX is the topic in hexadecimal (topics are any bytes). Both keys expire ``ttl`` after the
topic's last append; once the meta hash is gone, the next append starts a new epoch (the
client passes a fresh random one in, for Redis has no good randomness to offer a script).

The retention is the cluster's, not each caller's. A backplane opened with a history policy (a
worker's) runs the scripts in mode ``set``: its policy applies and is recorded in the meta
hash, at each append and each history read. One opened without (an emitter's, or
``trio-fanout publish``) runs them in mode ``follow``: the retention recorded for the topic
applies, and where none is recorded, the retention the workers record for the whole cluster
(``CLUSTER_RETENTION_KEY``, read when its connection to Redis is made), or its own policy (the
defaults) if no worker has recorded one. So an emitter that was not given the cluster's values
cannot shorten a room's history or its ttl, even once the room's own record has expired.
"""

from __future__ import annotations

import hashlib

KEY_PREFIX = b"trio-fanout:"

# What a subscriber receives on a topic's channel: a kind byte, then for an appended message
# its position, then the payload. A plain publish costs one byte; an appended one
# "\x01OFFSET:EPOCH:" before its payload.
# The retention the cluster's workers record for every topic (``s`` and ``t``, as in a topic's
# meta hash): what an emitter applies to a topic that has none recorded, such as a room whose
# keys expired while it was quiet, its members still joined. Not a topic's key: read and written
# by commands of their own, never by the scripts, which touch one hash slot only.
CLUSTER_RETENTION_KEY = KEY_PREFIX + b"retention"

PLAIN = b"\x00"
NUMBERED = b"\x01"

# KEYS: meta, stream. ARGV: payload, size, ttl in ms, channel, a fresh epoch, mode ("set" or
# "follow", see above). Returns {epoch, offset}.
APPEND = b"""
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local size, ttl = ARGV[2], ARGV[3]
if ARGV[6] == 'set' then
  redis.call('HSET', KEYS[1], 's', size, 't', ttl)
else
  local recorded = redis.call('HMGET', KEYS[1], 's', 't')
  if recorded[1] and recorded[2] then size, ttl = recorded[1], recorded[2] end
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
size = tonumber(size)
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'p', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[4], '\\1' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
return {epoch, offset}
"""

# KEYS: meta, stream. ARGV: a fresh epoch, ttl in ms, mode, count, since offset, since epoch,
# size, retention mode ("set" or "follow", see above).
# mode "newest": the newest COUNT kept payloads (COUNT -1: all); "after": the first COUNT
# (-1: all) after the since offset, if since is of this epoch and within what is kept.
# Returns {epoch, latest offset, first kept offset, offset of the first payload, payload...}.
HISTORY = b"""
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[8] == 'set' then
  redis.call('HSET', KEYS[1], 's', ARGV[7], 't', ARGV[2])
end
local latest = tonumber(redis.call('HGET', KEYS[1], 'o'))
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first_kept = latest + 1
if #oldest > 0 then
  first_kept = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
local count = tonumber(ARGV[4])
local entries = {}
if ARGV[3] == 'newest' then
  if count < 0 then
    entries = redis.call('XRANGE', KEYS[2], '-', '+')
  elseif count > 0 then
    local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', count)
    for i = #newest, 1, -1 do entries[#entries + 1] = newest[i] end
  end
else
  local since = tonumber(ARGV[5])
  if ARGV[6] == epoch and since >= first_kept - 1 and since <= latest and count ~= 0 then
    local start = (since + 1) .. '-0'
    if count < 0 then
      entries = redis.call('XRANGE', KEYS[2], start, '+')
    else
      entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', count)
    end
  end
end
local answer = {epoch, latest, first_kept, latest + 1}
if #entries > 0 then
  answer[4] = tonumber(string.match(entries[1][1], '^(%d+)'))
end
for _, entry in ipairs(entries) do answer[#answer + 1] = entry[2][2] end
return answer
"""

APPEND_SHA = hashlib.sha1(APPEND).hexdigest().encode()
HISTORY_SHA = hashlib.sha1(HISTORY).hexdigest().encode()


def topic_keys(topic: bytes) -> tuple[bytes, bytes]:
    """The topic's meta hash and stream, in one hash slot."""
    tag = KEY_PREFIX + b"{" + topic.hex().encode() + b"}:"
    return tag + b"meta", tag + b"stream"

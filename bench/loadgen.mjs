// One process of the load generator that bench/loadgen.py drives: a share of the WebSocket
// clients of a fan-out benchmark, speaking either trio-fanout's protocol or Socket.IO's (raw
// engine.io frames over the same `ws` client, so that both systems get the same client cost).
// bench/loadgen.py starts several of these processes and merges what they report; see it for
// the orchestration. Not part of the test suite.
//
//   node loadgen.mjs '{"system": "trio-fanout", "url": "ws://127.0.0.1:8765/ws",
//                      "session": "rate", "clients": 1000, "rooms": 10, "shard": 0, "shards": 2}'
//
// The process connects its share (global client g belongs to shard g % shards; publisher p to
// shard p % shards), prints {"event": "ready"} and then obeys one JSON command a line on stdin,
// answering each with one JSON line on stdout:
//   {"cmd": "rate", "deliveries": D, "duration": S}   publish for S seconds so that all members
//        of all shards receive D messages a second in all; print {"event": "published", "sent":
//        [per room]}; then wait for {"cmd": "expect", "sent": [per room, all shards]} and print
//        the step's result once every member got what was sent (or after a bounded drain).
//        Session "rate" has `publishers_per_room` publishers in each room (default 1), which
//        share the room's message rate evenly: room r's k-th is publisher r * publishers_per_room
//        + k.
//   {"cmd": "broadcast", "messages": M, "interval_ms": I}   session "broadcast": every member is
//        in one room; shard 0 publishes M messages I ms apart; each shard reports, for each
//        message, how many of its members got it and when the last one did.
//   {"cmd": "heartbeats", "from_ms": A, "until_ms": B}   session "broadcast": wait until B
//        (CLOCK_MONOTONIC ms) and a little more, then print {"event": "heartbeats", "beats":
//        [[seq, received, first arrival, last arrival, sent at (Unix s)], ...]} for the
//        heartbeats that arrived here between A and B (give or take HEARTBEAT_MARGIN_MS).
//   {"cmd": "quit"}   close every connection and exit.
// Session "idle" connects without joining and waits for "quit".
//
// Clients connect from the addresses in `source_addresses` (all in 127.0.0.0/8), a process's
// i-th client from address i mod their number: one source address gives only ~28,000 ephemeral
// ports towards one server port. "ready" says when this process began and finished connecting
// its members and how much CPU it used meanwhile, from which the orchestrator makes the rate of
// new connections.
//
// Receiving costs as little as we can make it: no JSON parsing of deliveries. Every published
// datum is a JSON string of fixed layout, "~PPPSSSSSSSSSTTTTTTTTTTTTTTT" (publisher number,
// unique across rooms; that publisher's own sequence number; send time in microseconds of
// CLOCK_MONOTONIC, which every process on the machine shares), found by looking for the one "~"
// byte in the raw frame. Each member checks each publisher's sequence on its own for order, loss
// and duplicates: the publishers of one room may interleave. Every step also reports this
// process's CPU (process.cpuUsage) and event-loop delay (perf_hooks.monitorEventLoopDelay), so
// that the orchestrator can refuse a step in which the load generator itself was the limit.
// A wss:// url is verified against the CA certificate in `ca_file` (PEM), if given.
import WebSocket from "ws";
import { readFileSync } from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { createInterface } from "node:readline";

const config = JSON.parse(process.argv[2]);
const { system, url, shard = 0, shards = 1 } = config;
const SOCKET_IO = system === "socket.io";
const CLIENT_OPTIONS = { perMessageDeflate: false, skipUTF8Validation: true };
if (config.ca_file) CLIENT_OPTIONS.ca = readFileSync(config.ca_file);
// Handshakes in flight at once per process: enough to connect thousands of clients in seconds
// without a burst that overflows the server's accept backlog.
const CONNECT_CONCURRENCY = Math.max(20, Math.floor(200 / shards));
// A client that is not ready this long after it began connecting makes the process fail,
// rather than leave the orchestrator waiting for ever.
const READY_TIMEOUT_MS = 60_000;
// How often a process says how many clients it has connected, while it connects.
const PROGRESS_INTERVAL_MS = 5000;
const SOURCE_ADDRESSES = config.source_addresses || [];
// How long members may take to receive the last of a step's messages before the rest counts
// as lost.
const DRAIN_MS = 3000;
// The event-loop delay monitor's timer interval; what it records includes this interval.
const LAG_RESOLUTION_MS = 10;
// Latency histogram: buckets of 50 µs up to 10 s, then one overflow bucket.
const BUCKET_US = 50;
const BUCKETS = 200_000;
const MARK = 0x7e; // "~"
// Publisher numbers fit the datum's 3 digits (bench/loadgen.py refuses more publishers).
const PUBLISHER_DIGITS = 3;
// CLOCK_MONOTONIC in milliseconds, from performance.now() plus an offset taken once.
const MONOTONIC_OFFSET_MS = Number(process.hrtime.bigint()) / 1e6 - performance.now();
const monotonicMs = () => performance.now() + MONOTONIC_OFFSET_MS;

function log(...args) {
  process.stderr.write(`loadgen ${shard}/${shards}: ${args.join(" ")}\n`);
}

function reply(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// The datum of a publish: fixed layout, so that a receiver can slice it without parsing JSON.
function datum(publisher, seq) {
  const us = Math.round(monotonicMs() * 1000);
  const field = (value, width) => String(value).padStart(width, "0");
  return `~${field(publisher, PUBLISHER_DIGITS)}${field(seq, 9)}${field(us, 15)}`;
}

// Read `width` decimal digits of `buffer` from `at` (no string is made).
function digits(buffer, at, width) {
  let value = 0;
  for (let i = at; i < at + width; i++) value = value * 10 + (buffer[i] - 48);
  return value;
}

// Each system's frames, as the text the client sends or expects.
const speak = SOCKET_IO
  ? {
      // engine.io open ("0{...}") is followed by our Socket.IO CONNECT ("40"), answered "40{...}".
      onOpenFrame: (ws, text) => {
        if (text.startsWith("0{")) ws.send("40");
        else if (text.startsWith("40")) return "welcome";
        else if (text.startsWith("430")) return "joined";
        else if (text.startsWith("44")) return "error";
        return null;
      },
      join: (room) => `420${JSON.stringify(["join", room])}`,
      publish: (room, data) => `42${JSON.stringify(["publish", room, data])}`,
    }
  : {
      onOpenFrame: (ws, text) => {
        if (text.includes('"type":"welcome"')) return "welcome";
        if (text.includes('"type":"joined"')) return "joined";
        if (text.includes('"type":"error"')) return "error";
        return null;
      },
      join: (room) => JSON.stringify({ type: "join", room, id: 1 }),
      publish: (room, data) => JSON.stringify({ type: "publish", room, data }),
    };

const ENGINE_IO_PING = 0x32; // "2": engine.io's ping, which a client must answer with "3"

// Open one client; resolve once it is welcomed (and has joined `room`, if given). After that,
// every frame goes to onFrame(ws, buffer).
function openClient(room, onFrame, localAddress) {
  return new Promise((resolve, reject) => {
    const target = SOCKET_IO ? `${url}/socket.io/?EIO=4&transport=websocket` : url;
    const options = localAddress ? { ...CLIENT_OPTIONS, localAddress } : CLIENT_OPTIONS;
    const ws = new WebSocket(target, options);
    ws.ready = false;
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`not ready after ${READY_TIMEOUT_MS} ms (from ${localAddress})`));
    }, READY_TIMEOUT_MS);
    const fail = (error) => {
      clearTimeout(timer);
      reject(error);
    };
    const ready = () => {
      clearTimeout(timer);
      ws.ready = true;
      resolve(ws);
    };
    ws.on("error", fail);
    ws.on("close", (code) => {
      if (!ws.ready) fail(new Error(`closed (${code}) before it was ready`));
    });
    ws.on("message", (buffer) => {
      if (SOCKET_IO && buffer.length === 1 && buffer[0] === ENGINE_IO_PING) {
        ws.send("3");
        return;
      }
      if (ws.ready) {
        onFrame(ws, buffer);
        return;
      }
      const text = buffer.toString();
      const event = speak.onOpenFrame(ws, text);
      if (event === "welcome") {
        if (room === null) ready();
        else ws.send(speak.join(room));
      } else if (event === "joined") {
        ready();
      } else if (event === "error") {
        fail(new Error(text));
      }
    });
  });
}

// Open a client for each of `rooms` (null: joins none), the i-th from source address i mod
// their number.
async function openMany(rooms, onFrame) {
  const clients = new Array(rooms.length);
  let next = 0;
  let opened = 0;
  const progress = setInterval(
    () => log(`${opened} of ${rooms.length} clients ready`),
    PROGRESS_INTERVAL_MS,
  );
  async function opener() {
    while (next < rooms.length) {
      const index = next++;
      const address = SOURCE_ADDRESSES.length
        ? SOURCE_ADDRESSES[index % SOURCE_ADDRESSES.length]
        : undefined;
      clients[index] = await openClient(rooms[index], onFrame, address);
      clients[index].index = index;
      opened++;
    }
  }
  try {
    await Promise.all(Array.from({ length: Math.min(CONNECT_CONCURRENCY, rooms.length) }, opener));
  } finally {
    clearInterval(progress);
  }
  return clients;
}

// openMany, timed: the clients, and when this process began and finished connecting them
// (CLOCK_MONOTONIC ms) with the CPU it used meanwhile, for the rate of new connections.
async function openManyTimed(rooms, onFrame) {
  const cpuStart = process.cpuUsage();
  const started = monotonicMs();
  const clients = await openMany(rooms, onFrame);
  const ended = monotonicMs();
  const cpu = process.cpuUsage(cpuStart);
  const connect = {
    connected: clients.length,
    started_ms: started,
    ended_ms: ended,
    cpu_seconds: (cpu.user + cpu.system) / 1e6,
  };
  return { clients, connect };
}

// The heartbeats that reach this process's clients, by sequence number: how many clients got
// each, when the first and the last did (CLOCK_MONOTONIC ms), and the send time it carries.
// trio-fanout's is {"type":"heartbeat","seq":N,"ts":T}; Socket.IO's, emitted by the primary,
// 42["heartbeat",{"seq":N,"ts":T}]; T is Unix time in seconds, to the millisecond.
const HEARTBEAT_PREFIX = Buffer.from(SOCKET_IO ? '42["heartbeat",' : '{"type":"heartbeat",');
const SEQ_KEY = Buffer.from('"seq":');
const TS_KEY = Buffer.from('"ts":');
// Arrivals this much before or after a report's window are still reported, so that the
// orchestrator sees every arrival of a heartbeat whose first arrival anywhere is in the window.
const HEARTBEAT_MARGIN_MS = 2000;
// Heartbeats older than this are forgotten (the record stays bounded over a long session).
const HEARTBEAT_KEEP_MS = 60_000;

function heartbeatRecorder() {
  const beats = new Map(); // seq -> [received, first, last, sent at]
  return {
    // Whether `buffer` was a heartbeat (and so recorded).
    onFrame(buffer) {
      const n = HEARTBEAT_PREFIX.length;
      if (buffer.length < n || buffer.compare(HEARTBEAT_PREFIX, 0, n, 0, n) !== 0) return false;
      const now = monotonicMs();
      const at = buffer.indexOf(SEQ_KEY) + SEQ_KEY.length;
      let end = at;
      while (buffer[end] >= 48 && buffer[end] <= 57) end++;
      const seq = digits(buffer, at, end - at);
      const seen = beats.get(seq);
      if (seen) {
        seen[0]++;
        seen[2] = now;
        return true;
      }
      const tsAt = buffer.indexOf(TS_KEY) + TS_KEY.length;
      const sentAt = parseFloat(buffer.toString("latin1", tsAt, buffer.indexOf(0x7d, tsAt)));
      beats.set(seq, [1, now, now, sentAt]);
      for (const [old, entry] of beats) {
        if (now - entry[1] > HEARTBEAT_KEEP_MS) beats.delete(old);
        else break; // a Map keeps insertion order: the rest are younger
      }
      return true;
    },
    async report(fromMs, untilMs) {
      const wait = untilMs + HEARTBEAT_MARGIN_MS - monotonicMs();
      if (wait > 0) await sleep(wait);
      const inWindow = [...beats].filter(
        ([, entry]) =>
          entry[1] >= fromMs - HEARTBEAT_MARGIN_MS && entry[1] <= untilMs + HEARTBEAT_MARGIN_MS,
      );
      return inWindow.map(([seq, entry]) => [seq, ...entry]);
    },
  };
}

// This process's CPU and event-loop delay between start() and stop().
function resourceMeter() {
  const lag = monitorEventLoopDelay({ resolution: LAG_RESOLUTION_MS });
  let cpuStart, wallStart;
  return {
    start() {
      lag.reset();
      lag.enable();
      cpuStart = process.cpuUsage();
      wallStart = performance.now();
    },
    stop() {
      lag.disable();
      const cpu = process.cpuUsage(cpuStart);
      const seconds = (performance.now() - wallStart) / 1000;
      const excess = (value) => Math.max(0, value / 1e6 - LAG_RESOLUTION_MS);
      return {
        cpu_percent: ((cpu.user + cpu.system) / 1e6 / seconds) * 100,
        lag_p50_ms: excess(lag.percentile(50)),
        lag_p99_ms: excess(lag.percentile(99)),
        lag_max_ms: excess(lag.max),
      };
    },
  };
}

// Commands from the orchestrator, one JSON object a line.
const commands = (() => {
  const lines = createInterface({ input: process.stdin });
  const queue = [];
  const waiting = [];
  lines.on("line", (line) => {
    const command = JSON.parse(line);
    if (waiting.length) waiting.shift()(command);
    else queue.push(command);
  });
  lines.on("close", () => {
    const quit = { cmd: "quit" };
    while (waiting.length) waiting.shift()(quit);
    queue.push(quit);
  });
  return () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => waiting.push(r)));
})();

async function rateSession() {
  const { clients: total, rooms, publishers_per_room: perRoom = 1 } = config;
  const myRooms = [];
  for (let g = shard; g < total; g += shards) myRooms.push(g % rooms);
  const roomOfMember = Int32Array.from(myRooms);
  const myPublishers = []; // publisher numbers
  for (let p = shard; p < rooms * perRoom; p += shards) myPublishers.push(p);

  // Per member and publisher of its room (the publisher's number modulo perRoom): the last
  // sequence number seen.
  const lastSeq = new Int32Array(myRooms.length * perRoom);
  const histogram = new Uint32Array(BUCKETS + 1);
  let received = 0, duplicated = 0, reordered = 0;
  const onFrame = (ws, buffer) => {
    const at = buffer.indexOf(MARK);
    if (at < 0) return; // a heartbeat
    const publisher = digits(buffer, at + 1, PUBLISHER_DIGITS);
    const seq = digits(buffer, at + 1 + PUBLISHER_DIGITS, 9);
    const sentUs = digits(buffer, at + 1 + PUBLISHER_DIGITS + 9, 15);
    const slot = ws.index * perRoom + (publisher % perRoom);
    const last = lastSeq[slot];
    if (seq === last + 1) {
      received++;
    } else if (seq <= last) {
      duplicated++;
      return;
    } else {
      reordered++;
      received++;
    }
    lastSeq[slot] = seq;
    const bucket = Math.floor((monotonicMs() * 1000 - sentUs) / BUCKET_US);
    histogram[Math.max(0, Math.min(BUCKETS, bucket))]++;
  };
  const members = await openMany(myRooms.map((r) => `room-${r}`), onFrame);
  const publishers = await openMany(myPublishers.map(() => null), () => {});
  const seq = new Int32Array(rooms * perRoom);
  reply({ event: "ready", members: members.length, publishers: publishers.length });

  const meter = resourceMeter();
  for (;;) {
    const command = await commands();
    if (command.cmd === "quit") break;
    const { deliveries, duration } = command;
    // The counters were zeroed after the last report, not here: another process may have
    // started publishing before this one read its command.
    meter.start();
    // Our share of the publishes: every room gets deliveries / total publishes a second, split
    // evenly among its publishers. A room's k-th publisher is k / perRoom of a period ahead of
    // its first, so that together they keep an even pace instead of sending in bursts.
    const perPublisherPerSecond = deliveries / total / perRoom;
    const sent = new Array(rooms).fill(0);
    const sentBy = new Array(publishers.length).fill(0);
    const start = performance.now();
    while (performance.now() - start < duration * 1000) {
      const elapsed = (performance.now() - start) / 1000;
      for (let i = 0; i < publishers.length; i++) {
        const publisher = myPublishers[i];
        const room = Math.floor(publisher / perRoom);
        const due = Math.floor(elapsed * perPublisherPerSecond + (publisher % perRoom) / perRoom);
        while (sentBy[i] < due) {
          seq[publisher]++;
          sentBy[i]++;
          sent[room]++;
          publishers[i].send(speak.publish(`room-${room}`, datum(publisher, seq[publisher])));
        }
      }
      await sleep(2);
    }
    const publishSeconds = (performance.now() - start) / 1000;
    reply({ event: "published", sent });
    const expect = await commands();
    let expected = 0;
    for (let m = 0; m < roomOfMember.length; m++) expected += expect.sent[roomOfMember[m]];
    const drainStart = performance.now();
    while (received < expected && performance.now() - drainStart < DRAIN_MS) await sleep(5);
    const usage = meter.stop();
    const buckets = [];
    for (let b = 0; b <= BUCKETS; b++) if (histogram[b]) buckets.push([b, histogram[b]]);
    reply({
      event: "step", expected, received, lost: expected - received, duplicated, reordered,
      publish_seconds: publishSeconds, bucket_us: BUCKET_US, latency_buckets: buckets, ...usage,
    });
    histogram.fill(0);
    received = duplicated = reordered = 0;
  }
  for (const ws of [...members, ...publishers]) ws.terminate();
}

async function broadcastSession() {
  const count = Math.ceil((config.clients - shard) / shards);
  // seq -> [received, last arrival in monotonic ms]; sequence numbers are never reused, so this
  // is cleared only after a report (another process may publish before this one reads its
  // command).
  let arrivals = new Map();
  const heartbeats = heartbeatRecorder();
  // Frames other than the step's messages (the heartbeats) that arrived during a step: the
  // server's CPU over the step sent them too.
  let otherFrames = 0;
  const onFrame = (ws, buffer) => {
    const at = buffer.indexOf(MARK);
    if (at < 0) {
      heartbeats.onFrame(buffer);
      otherFrames++;
      return;
    }
    const seq = digits(buffer, at + 1 + PUBLISHER_DIGITS, 9);
    const now = monotonicMs();
    const seen = arrivals.get(seq);
    if (seen) {
      seen[0]++;
      seen[1] = now;
    } else {
      arrivals.set(seq, [1, now]);
    }
  };
  const { clients: members, connect } = await openManyTimed(
    new Array(count).fill("everyone"),
    onFrame,
  );
  const publishers = shard === 0 ? await openMany([null], () => {}) : [];
  reply({ event: "ready", members: members.length, publishers: publishers.length, connect });
  const meter = resourceMeter();
  let seq = 0;
  for (;;) {
    const command = await commands();
    if (command.cmd === "quit") break;
    if (command.cmd === "heartbeats") {
      meter.start();
      const beats = await heartbeats.report(command.from_ms, command.until_ms);
      reply({ event: "heartbeats", beats, ...meter.stop() });
      continue;
    }
    meter.start();
    otherFrames = 0;
    const sentAt = [];
    for (let i = 0; i < command.messages && publishers.length; i++) {
      seq++;
      sentAt.push([seq, monotonicMs()]);
      publishers[0].send(speak.publish("everyone", datum(0, seq)));
      await sleep(command.interval_ms);
    }
    if (!publishers.length) await sleep(command.messages * command.interval_ms);
    // Let the last message arrive everywhere (bounded).
    await sleep(Math.min(DRAIN_MS, 1000));
    reply({ event: "step", sent_at_ms: sentAt, arrivals: [...arrivals], members: members.length,
            other_frames: otherFrames, ...meter.stop() });  // prettier-ignore
    arrivals = new Map();
  }
  for (const ws of [...members, ...publishers]) ws.terminate();
}

async function idleSession() {
  const count = Math.ceil((config.clients - shard) / shards);
  const clients = await openMany(new Array(count).fill(null), () => {});
  reply({ event: "ready", members: clients.length, publishers: 0 });
  while ((await commands()).cmd !== "quit");
  for (const ws of clients) ws.terminate();
}

const sessions = { rate: rateSession, broadcast: broadcastSession, idle: idleSession };
try {
  await sessions[config.session]();
} catch (error) {
  log(error.stack || error);
  process.exit(1);
}
process.exit(0);

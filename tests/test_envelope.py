"""The backplane envelope (trio_fanout/envelope.py): per-topic numbering and gap counting."""

from __future__ import annotations

import struct

import pytest

from trio_fanout import envelope
from trio_fanout.envelope import MAX_ORIGINS_PER_TOPIC, GapCounter, Numberer

ORIGIN = b"\x01\x02\x03\x04\x05\x06\x07\x08"
OTHER = b"\x11" * 8


def seq_of(payload: bytes) -> int:
    return envelope.unpack_header(payload)[1]


def test_numbering_starts_at_1_and_is_per_topic() -> None:
    numberer = Numberer(ORIGIN)
    assert [seq_of(numberer.wrap(b"r:a", b"{}")) for _ in range(3)] == [1, 2, 3]
    assert seq_of(numberer.wrap(b"r:b", b"{}")) == 1
    assert seq_of(numberer.wrap(b"r:a", b"{}")) == 4
    assert seq_of(numberer.wrap(b"r:b", b"{}")) == 2


def test_two_numberers_count_independently() -> None:
    first, second = Numberer(ORIGIN), Numberer(OTHER)
    first.wrap(b"r:a", b"")
    assert seq_of(second.wrap(b"r:a", b"")) == 1


def test_wrap_and_unpack_header_round_trip() -> None:
    frame = b'{"type":"message","room":"a","data":1}'
    payload = Numberer(ORIGIN).wrap(b"r:a", frame, exclude=2**64 - 1)
    assert envelope.unpack_header(payload) == (ORIGIN, 1, 2**64 - 1)
    assert payload[envelope.HEADER_SIZE :] == frame
    assert envelope.HEADER_SIZE == 24


def test_exclude_defaults_to_nobody() -> None:
    assert envelope.unpack_header(Numberer(ORIGIN).wrap(b"t", b"x")) == (ORIGIN, 1, 0)


def test_origin_is_random_8_bytes_when_not_given() -> None:
    first, second = Numberer(), Numberer()
    assert len(first.origin) == 8
    assert first.origin != second.origin
    assert envelope.unpack_header(first.wrap(b"t", b""))[0] == first.origin


def test_unpack_header_refuses_a_short_payload() -> None:
    with pytest.raises(struct.error):
        envelope.unpack_header(b"\x00" * (envelope.HEADER_SIZE - 1))


LOBBY_DIGEST = "dbbcde567e11a0561b54c65a94dc0d10"


def test_room_topic_is_prefixed_and_cannot_be_the_broadcast_topic() -> None:
    assert envelope.room_topic("caf\u00e9").startswith(b"r:")
    assert envelope.room_topic("*") != envelope.BROADCAST_TOPIC


def test_room_topics_have_one_size_whatever_the_name() -> None:
    names = ["a", "caf\u00e9", "x" * 200, "y" * 800]
    topics = [envelope.room_topic(name) for name in names]
    assert {len(topic) for topic in topics} == {2 + envelope.ROOM_DIGEST_SIZE}
    assert len(set(topics)) == len(names)


def test_a_room_has_the_same_topic_in_every_process() -> None:
    # A fixed value, not one computed here: every worker, emitter and version must agree on it.
    assert envelope.room_topic("lobby") == b"r:" + bytes.fromhex(LOBBY_DIGEST)


def test_numbering_restarts_from_1_past_the_topic_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "MAX_NUMBERED_TOPICS", 3)
    numberer = Numberer(ORIGIN)
    for topic in (b"a", b"b", b"c"):
        numberer.wrap(topic, b"")
    assert seq_of(numberer.wrap(b"a", b"")) == 2  # known topic: no restart
    assert seq_of(numberer.wrap(b"d", b"")) == 1
    assert seq_of(numberer.wrap(b"a", b"")) == 1  # numbering began afresh


def test_gap_counter_counts_skipped_messages() -> None:
    gaps = GapCounter()
    assert gaps.observe(b"t", ORIGIN, 1) == 0
    assert gaps.observe(b"t", ORIGIN, 2) == 0
    assert gaps.observe(b"t", ORIGIN, 5) == 2
    assert gaps.observe(b"t", ORIGIN, 6) == 0
    assert gaps.observe(b"t", ORIGIN, 10) == 3
    assert gaps.missed == 5


def test_gap_counter_keeps_a_bounded_number_of_publishers_per_topic() -> None:
    gaps = GapCounter()
    gaps.observe(b"t", ORIGIN, 1)
    for number in range(10 * MAX_ORIGINS_PER_TOPIC):  # a forged origin per message
        gaps.observe(b"t", number.to_bytes(8, "big"), 3)
        gaps.observe(b"t", ORIGIN, number + 2)  # heard all along: never forgotten
    assert len(gaps._last_seq[b"t"]) == MAX_ORIGINS_PER_TOPIC
    assert gaps.observe(b"t", ORIGIN, 10 * MAX_ORIGINS_PER_TOPIC + 3) == 1
    assert gaps.missed == 1


def test_gap_counter_first_message_seen_is_never_a_gap() -> None:
    # Joining a room mid-stream: seq 40 is the first we see of that publisher.
    gaps = GapCounter()
    assert gaps.observe(b"t", ORIGIN, 40) == 0
    assert gaps.observe(b"t", ORIGIN, 42) == 1
    assert gaps.missed == 1


def test_gap_counter_keeps_publishers_and_topics_apart() -> None:
    gaps = GapCounter()
    gaps.observe(b"t", ORIGIN, 1)
    gaps.observe(b"t", OTHER, 7)
    gaps.observe(b"u", ORIGIN, 3)
    assert gaps.observe(b"t", ORIGIN, 2) == 0
    assert gaps.observe(b"t", OTHER, 8) == 0
    assert gaps.observe(b"u", ORIGIN, 4) == 0
    assert gaps.missed == 0


def test_gap_counter_accepts_seq_1_as_restart() -> None:
    gaps = GapCounter()
    gaps.observe(b"t", ORIGIN, 1)
    gaps.observe(b"t", ORIGIN, 50)
    missed = gaps.missed
    assert gaps.observe(b"t", ORIGIN, 1) == 0
    assert gaps.missed == missed
    assert gaps.observe(b"t", ORIGIN, 2) == 0
    assert gaps.observe(b"t", ORIGIN, 4) == 1


def test_gap_counter_ignores_duplicates_and_old_messages() -> None:
    gaps = GapCounter()
    gaps.observe(b"t", ORIGIN, 5)
    assert gaps.observe(b"t", ORIGIN, 5) == 0
    assert gaps.observe(b"t", ORIGIN, 3) == 0
    assert gaps.missed == 0


def test_gap_counter_forget_stops_tracking_a_topic() -> None:
    gaps = GapCounter()
    gaps.observe(b"t", ORIGIN, 1)
    gaps.observe(b"u", ORIGIN, 1)
    gaps.forget(b"t")
    # Rejoining later: what was published while we were away is not a gap.
    assert gaps.observe(b"t", ORIGIN, 100) == 0
    assert gaps.observe(b"u", ORIGIN, 100) == 98  # other topics are still tracked
    gaps.forget(b"never-seen")  # harmless


def test_numberer_and_gap_counter_agree() -> None:
    numberer, gaps = Numberer(ORIGIN), GapCounter()
    payloads = [numberer.wrap(b"t", str(i).encode()) for i in range(10)]
    for i, payload in enumerate(payloads):
        if i in (3, 4, 8):
            continue  # lost on the way
        origin, seq, _ = envelope.unpack_header(payload)
        gaps.observe(b"t", origin, seq)
    assert gaps.missed == 3

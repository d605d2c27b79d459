"""The control channel's bytes (trio_fanout.control), without sockets: answers split however
the socket delivers them, and bytes that are no answer refused rather than misread."""

from __future__ import annotations

import json

import pytest

from trio_fanout import control


def test_answers_come_out_whole_however_the_bytes_are_split():
    report = json.dumps({"worker": 1, "joins": 3}).encode()
    stream = (
        control.PING
        + control.encode_answer(control.REPORT, report)
        + control.PING
        + control.encode_answer(control.INFO, b"")
    )
    for size in (1, 2, 3, 7, len(stream)):
        reader = control.AnswerReader()
        answers = []
        for start in range(0, len(stream), size):
            answers += reader.feed(stream[start : start + size])
        assert answers == [
            (control.PING, b""),
            (control.REPORT, report),
            (control.PING, b""),
            (control.INFO, b""),
        ]


def test_a_byte_that_begins_no_answer_breaks_the_channel():
    with pytest.raises(control.ChannelBroken, match="unexpected byte"):
        control.AnswerReader().feed(control.PING + b"X")


def test_an_answer_too_large_to_be_one_breaks_the_channel():
    header = control.encode_answer(control.REPORT, b"")[:1] + (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(control.ChannelBroken, match="bytes on the control channel"):
        control.AnswerReader().feed(header)

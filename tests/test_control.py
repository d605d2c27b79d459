"""The control channel (trio_fanout.control): its bytes without sockets, split however the
socket delivers them, bytes that are no request or answer refused rather than misread; and the
master's and the worker's ends talking over a real socket pair."""

from __future__ import annotations

import itertools
import json
import socket

import pytest
import trio

from trio_fanout import control, master, runner

ANSWER_TIMEOUT = 5.0


def test_answers_come_out_whole_however_the_bytes_are_split():
    report = json.dumps({"worker": 1, "joins": 3}).encode()
    stream = (
        control.PING
        + control.encode_answer(control.REPORT, 7, report)
        + control.PING
        + control.encode_answer(control.INFO, 2**32 - 1, b"")
    )
    for size in (1, 2, 3, 7, len(stream)):
        reader = control.AnswerReader()
        answers = []
        for start in range(0, len(stream), size):
            answers += reader.feed(stream[start : start + size])
        assert answers == [
            (control.PING, 0, b""),
            (control.REPORT, 7, report),
            (control.PING, 0, b""),
            (control.INFO, 2**32 - 1, b""),
        ]


def test_requests_come_out_whole_however_the_bytes_are_split():
    stream = control.PING + control.encode_request(control.RELOAD, 1) + control.PING
    stream += control.encode_request(control.REPORT, 300)
    for size in (1, 2, 4, len(stream)):
        reader = control.RequestReader()
        requests = []
        for start in range(0, len(stream), size):
            requests += reader.feed(stream[start : start + size])
        assert requests == [
            (control.PING, 0),
            (control.RELOAD, 1),
            (control.PING, 0),
            (control.REPORT, 300),
        ]


def test_a_byte_that_begins_no_answer_breaks_the_channel():
    with pytest.raises(control.ChannelBroken, match="unexpected byte"):
        control.AnswerReader().feed(control.PING + b"X")
    with pytest.raises(control.ChannelBroken, match="unexpected byte"):
        control.RequestReader().feed(control.PING + b"X")


def test_an_answer_too_large_to_be_one_breaks_the_channel():
    header = control.encode_answer(control.REPORT, 1, b"")[:5] + (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(control.ChannelBroken, match="bytes on the control channel"):
        control.AnswerReader().feed(header)


async def test_a_late_answer_is_not_taken_for_the_next_question(monkeypatch):
    """The master's end (``master.WorkerLink``) and the worker's (``runner.answer_master``),
    the real code on a real socket pair, in one process: a worker process cannot be made to
    answer late on cue, and two of its reports made at the same moment would be alike, while
    here each report is numbered."""
    reports = itertools.count(1)

    def report(kind: bytes) -> bytes:
        return json.dumps({"report": next(reports)}).encode()

    master_end, worker_end = socket.socketpair()
    with trio.socket.from_stdlib_socket(master_end) as sock:
        link = master.WorkerLink(sock, master_end)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.take_answers)
            # Nothing reads the worker's end yet: the first question goes unanswered, however
            # long the master waits; waiting little keeps the test short.
            monkeypatch.setattr(master, "REQUEST_TIMEOUT", 0.01)
            assert await link.ask(control.REPORT) is None
            monkeypatch.undo()
            # The worker now answers both questions, the first one late.
            nursery.start_soon(runner.answer_master, worker_end, trio.Event(), report)
            with trio.fail_after(ANSWER_TIMEOUT):
                assert await link.ask(control.REPORT) == {"report": 2}
                assert await link.ask(control.REPORT) == {"report": 3}
            nursery.cancel_scope.cancel()

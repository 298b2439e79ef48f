"""The proxy's hand-off pipe to its recorder: in order, whole, never blocking the event loop, failing loudly;
and the recorder's pacing of its rounds on it under load."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import threading
import time

import pytest

from ingest.handoff import HandOffClosed, Inbox, Outbox
from ingest.recorder import LOADED_ROUND, PACE_BYTES, _pace


def _pipe() -> tuple[Inbox, Outbox]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    return Inbox(reader), Outbox(writer)


def _drain(inbox: Inbox, count: int) -> list:
    return [inbox.get(timeout=10) for _ in range(count)]


def test_messages_arrive_in_order_and_whole_across_pipe_sized_boundaries():
    inbox, outbox = _pipe()
    messages = [("events", [("s", "frames", {"data": os.urandom(size)}, i)]) for i, size in
                enumerate([0, 1, 65_535, 1 << 20, 3 << 20, 7, 200_000])]
    reader = threading.Thread(target=lambda: received.extend(_drain(inbox, len(messages))))
    received: list = []
    reader.start()
    for message in messages:
        outbox.send(message)  # no event loop here: returns once the pipe holds it
    reader.join(10)
    assert received == messages


def test_on_an_event_loop_a_send_never_blocks_and_the_loop_writes_the_rest():
    inbox, outbox = _pipe()
    big = [("events", os.urandom(2 << 20)) for _ in range(4)]  # 8 MiB: many times what the pipe holds

    async def hand_over() -> float:
        started = time.monotonic()
        for message in big:
            outbox.send(message)
        took = time.monotonic() - started
        received: list = []
        reading = asyncio.get_running_loop().run_in_executor(None, lambda: received.extend(_drain(inbox, len(big))))
        await asyncio.wait_for(reading, 20)  # the loop's writer feeds the pipe while the reader empties it
        assert received == big
        return took

    took = asyncio.run(hand_over())
    assert took < 2, f"send blocked the loop for {took:.1f} s with nobody reading"


def test_a_caller_off_the_loop_waits_behind_what_the_loop_still_holds():
    inbox, outbox = _pipe()

    async def leave_pending() -> None:
        outbox.send(("events", os.urandom(4 << 20)))  # more than the pipe holds: the rest waits for the loop

    asyncio.run(leave_pending())  # the loop is gone before it wrote the rest
    received: list = []
    reader = threading.Thread(target=lambda: received.extend(_drain(inbox, 2)))
    reader.start()
    outbox.send(("stop", 1.0))  # off any loop: writes what waits first, then this, in order
    reader.join(10)
    assert [message[0] for message in received] == ["events", "stop"]
    assert len(received[0][1]) == 4 << 20


def test_a_gone_reader_fails_the_hand_off_loudly():
    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    reader.close()
    with pytest.raises(HandOffClosed, match="closed"):
        outbox.send(("events", [1, 2, 3]))
    with pytest.raises(HandOffClosed):  # and every send after it
        outbox.send(("flush", 1, 1.0))


def test_get_times_out_empty_and_an_ended_writer_reads_as_empty_after_the_last_message():
    inbox, outbox = _pipe()
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.05)
    outbox.send(("last",))
    outbox.close()
    assert inbox.get(timeout=1) == ("last",)
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    assert inbox.ended


def test_pacing_lets_a_round_gather_but_not_while_a_bulk_transfer_fills_the_pipe():
    inbox, outbox = _pipe()
    started = time.monotonic()
    _pace(inbox, started)
    assert LOADED_ROUND <= time.monotonic() - started < LOADED_ROUND + 0.5
    outbox.send(("events", os.urandom(PACE_BYTES)))
    started = time.monotonic()
    _pace(inbox, started)
    assert time.monotonic() - started < LOADED_ROUND / 2
    assert inbox.waiting_bytes() > PACE_BYTES and len(inbox.get(timeout=1)[1]) == PACE_BYTES
    assert inbox.waiting_bytes() == 0


def test_a_send_with_a_timeout_waits_even_on_the_loop_and_gives_up_on_a_reader_that_does_not_read():
    inbox, outbox = _pipe()

    async def close_like() -> bool:
        return outbox.send(("stop", 1.0), timeout=0.2)  # as close() and flush() do, wherever they run

    assert asyncio.run(close_like())  # room in the pipe: written at once
    started = time.monotonic()
    assert not outbox.send(("events", os.urandom(4 << 20)), timeout=0.3)  # nobody reads: bounded, not stuck
    assert 0.3 <= time.monotonic() - started < 2
    assert inbox.get(timeout=1) == ("stop", 1.0)

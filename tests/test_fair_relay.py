"""One session's large result, masked or not, must not hold up the others on the proxy's event loop (issue 11,
point 6).

Measured with bench/policy.py: another session's SELECT 1 waited, at each
hop through the proxy, for the masked session's next slice (it was queued
with call_soon, ahead of the sockets that had become ready) and for the
whole of a 256 KiB read to be cut into messages before its first slice.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from nacl.public import PrivateKey

from ingest.protocols.postgres import MessageReader
from ingest.protocols.postgres import messages as m
from proxy.core.commands import Cede, OpenUpstream, Send, VerifyToken
from proxy.core.policy import PolicyRuntime
from proxy.core.runner import CommandRunner
from proxy.core.session import Session
from proxy.identity import Identity
from proxy.policy import PolicyHolder
from proxy.postgres import frontend
from pg_fixtures import start_proxy
from test_pg_proxy_session import FakeRecording, only, protocol, sent, upstream_greeting

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "proxy" / "policies" / "default.toml"


def identity(name: str, group: str) -> Identity:
    return Identity(name, name, name, (group,), "https://idp/", None, datetime(2030, 1, 1, tzinfo=timezone.utc))


EVE = identity("eve@example.com", "dev")  # the default policy masks her results
BOB = identity("bob@example.com", "dba")  # exempt


# --- ceding: behind the sockets that are ready -------------------------------------------------


class _Order:
    """A session that notes when its Cede completes."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def completed(self, command, result=None) -> list:
        self.order.append("ceded")
        return []


class _Runner(CommandRunner):
    def run(self, commands) -> None:
        pass


def test_a_ceded_session_goes_on_only_after_the_sockets_that_became_ready_meanwhile():
    order: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runner = _Runner(verifier=None, approvals=None)
        runner.session = _Order(order)
        reader, writer = socket.socketpair()
        with reader, writer:
            loop.add_reader(reader, lambda: (order.append("other session"), loop.remove_reader(reader)))
            writer.send(b"SELECT 1")  # another session's bytes arrive while the heavy one works on a slice
            assert runner.run_shared(Cede())
            while len(order) < 2:
                await asyncio.sleep(0.001)

    asyncio.run(main())
    assert order == ["other session", "ceded"]


# --- a masked session's large read is cut into messages a piece at a time ----------------------


def policy_runtime() -> PolicyRuntime:
    return PolicyRuntime(PolicyHolder(DEFAULT_POLICY), PrivateKey.generate().public_key, "proxy+key")


def ready(who: Identity) -> tuple[Session, FakeRecording]:
    recording = FakeRecording()
    session = Session(protocol=protocol(), recording=recording, source_address="10.0.0.9:5555",
                      policy=policy_runtime())
    session.start()
    session.data("client", m.startup_message({"user": who.username, "application_name": "psql"}))
    verify = only(session.data("client", m.password_message("the-token")), VerifyToken)
    session.completed(only(session.completed(verify, who), OpenUpstream), None)
    session.data("server", upstream_greeting())
    assert session.front.phase == "relay"
    sent(session.data("client", m.query("SELECT id, email, note, ssn FROM t")), "server")
    return session, recording


def result(rows: int) -> bytes:
    """PostgreSQL's answer to that query: text columns, a card number and an SSN in every row."""
    def field(name: str, type_oid: int) -> bytes:
        return name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, type_oid, -1, -1, 0)

    body = struct.pack("!h", 4) + field("id", 23) + field("email", 25) + field("note", 25) + field("ssn", 25)
    out = [b"T" + struct.pack("!I", len(body) + 4) + body]
    for i in range(1, rows + 1):
        out.append(m.data_row([str(i).encode(), f"user{i}@mail.example".encode(),
                               f"paid with 4111 1111 1111 1111 on order {i}".encode(), f"123-45-{i % 10000:04d}".encode()]))
    tag = f"SELECT {rows}".encode() + b"\0"
    out.append(b"C" + struct.pack("!I", len(tag) + 4) + tag)
    return b"".join(out) + m.ready_for_query("I")


def relay(session: Session, data: bytes, cuts: list[int], contended: bool = False) -> tuple[bytes, int]:
    """What the client gets for one read from the target, every Cede completed (with `contended`: whether another
    session waits for its reply); and how many there were."""
    reader = session.front._upstream
    feed = reader.feed

    def noted(piece: bytes):
        cuts.append(len(piece))
        return feed(piece)

    reader.feed = noted
    out, client, cedes = session.data("server", data), b"", 0
    while True:
        client += sent(out, "client")
        if not out or not isinstance(out[-1], Cede):
            return client, cedes
        cedes += 1
        out = session.completed(out[-1], contended)


def test_a_large_read_of_a_masked_session_is_cut_in_pieces_with_the_same_answer(monkeypatch):
    data = result(3000)
    assert len(data) > 3 * frontend.PIECE_READ
    pieces: list[int] = []
    session, recording = ready(EVE)
    earlier = len(recording.events)
    client, cedes = relay(session, data, pieces)
    assert max(pieces) <= frontend.PIECE_READ and len(pieces) == -(-len(data) // frontend.PIECE_READ)
    assert cedes >= 3000 // frontend.MASK_SLICE  # a turn of the loop between pieces as between slices

    monkeypatch.setattr(frontend, "PIECE_READ", 1 << 30)  # as before: the read cut into messages at once
    whole: list[int] = []
    before, _ = relay(ready(EVE)[0], data, whole)
    assert whole == [len(data)]
    shown = MessageReader("server").feed(client)
    assert client == before and len(shown) == 3003 and b"4111 1111" not in client
    assert b"[MASKED:column]" in client and not session.is_closed

    records = [record for kind, body in recording.events[earlier:] for record in body["messages"]]
    assert sum(int(record["attributes"].get("messages", "1")) for record in records) == 3003  # all recorded


def test_a_masked_result_is_relayed_in_sends_of_many_slices_each_recorded_before_it_is_sent():
    """A send, a hand-off to the recorder and a seal per 32-row slice were ~20 % of the relay's time in a masked
    stream: slices are recorded and relayed together, MASKED_SEND bytes at a time, still record before relay."""
    data = result(3000)
    session, recording = ready(EVE)
    earlier = len(recording.events)
    reader, sends, shown = MessageReader("server"), [], 0
    out = session.data("server", data)
    while out:
        for command in out:
            if isinstance(command, Send) and command.side == "client":
                shown += len(reader.feed(command.data))
                recorded = sum(int(record["attributes"].get("messages", "1"))
                               for kind, body in recording.events[earlier:] for record in body["messages"])
                assert recorded >= shown  # every message the client has was recorded first
                sends.append(len(command.data))
        out = session.completed(out[-1]) if isinstance(out[-1], Cede) else []
    pieces = -(-len(data) // frontend.PIECE_READ)
    assert shown == 3003 and not session.is_closed
    assert len(sends) <= pieces * (frontend.PIECE_READ // frontend.MASKED_SEND + 1)  # not one per slice
    assert len(sends) < 3000 // frontend.MASK_SLICE // 4
    assert all(size >= frontend.MASKED_SEND for size in sends[:3])  # a piece's sends before its last are full


def test_while_another_session_waits_for_its_reply_a_masked_result_is_masked_in_short_slices():
    """A `Cede` completes with whether another session waits for its target's reply: that reply waits behind the
    next slice, so the slice is MASK_SLICE_CONTENDED rows instead of MASK_SLICE (bench/policy.py: the other
    session's SELECT 1 p50 beside a masked stream ~1.05 ms -> ~0.73 ms). The client gets the same bytes."""
    data = result(3000)
    alone, alone_cedes = relay(ready(EVE)[0], data, [])
    contended, contended_cedes = relay(ready(EVE)[0], data, [], contended=True)
    assert contended == alone and b"4111 1111" not in contended
    pieces = -(-len(data) // frontend.PIECE_READ)
    assert alone_cedes <= 3000 // frontend.MASK_SLICE + 2 * pieces
    first_slices = pieces * (frontend.MASK_SLICE // frontend.MASK_SLICE_CONTENDED)  # each piece starts with a full one
    assert contended_cedes >= 3000 // frontend.MASK_SLICE_CONTENDED - first_slices > 3 * alone_cedes


def test_a_session_counts_as_awaiting_its_targets_reply_from_its_send_until_the_reply(broker, tmp_path):
    """The core's side of it (proxy.core.server): a session that sent its target a query and has had nothing back
    is counted in its listener's `awaiting_replies`; `others_await_replies` leaves the session itself out."""
    proxy = start_proxy(tmp_path / "custody", broker)
    try:
        listener = proxy.background.service.proxies[0]

        def state() -> list[tuple[int, bool]]:
            return proxy.background.call(lambda: sorted(
                (int(c._awaiting_reply), c.others_await_replies()) for c in listener.connections))

        with psycopg.connect(proxy.dsn(), autocommit=True) as idle, \
                psycopg.connect(proxy.dsn(), autocommit=True) as busy:
            idle.execute("SELECT 1")
            assert state() == [(0, False), (0, False)] and proxy.background.call(lambda: listener.awaiting_replies) == 0
            sleeping = threading.Thread(target=busy.execute, args=("SELECT pg_sleep(1.5)",))
            sleeping.start()
            deadline = time.monotonic() + 1.0
            while state() != [(0, True), (1, False)] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert state() == [(0, True), (1, False)]  # the idle one sees another waiting; the waiting one does not
            sleeping.join()
            assert state() == [(0, False), (0, False)]
        deadline = time.monotonic() + 5.0
        while proxy.background.call(lambda: len(listener.connections)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.background.call(lambda: listener.awaiting_replies) == 0
    finally:
        proxy.background.stop(30)


def test_an_exempt_sessions_large_read_is_cut_in_pieces_too_and_relayed_byte_for_byte():
    """Nothing masked, but parsing and recording a 256 KiB read of small rows held the loop as long: a `SELECT 1`
    beside an unmasked bulk result had a p99 18x its idle one, 10x with the read in pieces (bench/policy.py)."""
    data = result(3000)
    pieces: list[int] = []
    session, recording = ready(BOB)
    earlier = len(recording.events)
    client, cedes = relay(session, data, pieces)
    assert client == data and not session.is_closed
    assert max(pieces) <= frontend.PIECE_READ and len(pieces) == -(-len(data) // frontend.PIECE_READ)
    assert cedes == len(pieces) - 1
    records = [record for kind, body in recording.events[earlier:] for record in body["messages"]]
    assert sum(int(record["attributes"].get("messages", "1")) for record in records) == 3003


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))

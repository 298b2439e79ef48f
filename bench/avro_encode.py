"""Envelope encoding CPU: ingest/envelope_writer.py beside fastavro (`ENVELOPE.encode`), same events, same run.

Why it matters (issue 11): py-spy --gil of the recorder under pgbench put fastavro's writer at 49% of the
recorder's CPU. The events are what the recorder signs under pgbench select-only: each transaction's reads
(a Query; RowDescription, DataRow, CommandComplete, ReadyForQuery) made records by the PostgreSQL front end's
`message_records`, folded by `ingest.batching.fold` into mixed-direction Frames events, the envelope built
by `SessionChain.event`. Two shapes: events folded up to --messages messages (the recorder under load) and
one read an event (low load: 1 or 4 messages, where the envelope's own fields weigh more). CPU time
(time.process_time), the encoders alternating, best of --rounds; every envelope's bytes are checked equal
first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from ingest.avro import ENVELOPE  # noqa: E402
from ingest.batching import fold  # noqa: E402
from ingest.envelope_writer import encode_envelope  # noqa: E402
from ingest.events import SessionChain  # noqa: E402
from ingest.keys import PrivateKey, key_id_for  # noqa: E402
from ingest.protocols.postgres import messages as pg  # noqa: E402
from ingest.protocols.postgres.protocol import Message  # noqa: E402
from proxy.postgres.recording import message_records  # noqa: E402

RUN_ALL_ARGS = ["--events", "300"]


def transaction_reads(aid: int) -> list[tuple[str, list[Message]]]:
    """One pgbench select-only transaction as the proxy reads it: the client's Query, the server's answer."""
    sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
    return [("client", [Message("Query", pg.query(sql))]),
            ("server", [Message("RowDescription", pg.row_description(["abalance"])),
                        Message("DataRow", pg.data_row([str(aid % 5000 - 2500).encode()])),
                        Message("CommandComplete", pg.command_complete("SELECT 1")),
                        Message("ReadyForQuery", pg.ready_for_query("I"))])]


def envelopes(events: int, max_messages: int) -> list[dict[str, Any]]:
    """`events` Frames envelopes as the recorder signs them, reads folded up to `max_messages` messages an
    event (1: every read its own event, as at low load)."""
    signing_key = SigningKey.generate()
    chain = SessionChain(PrivateKey(key_id_for("bench", bytes(signing_key.verify_key)), signing_key), "bench")
    items, ts = [], 1_700_000_000_000_000
    for aid in range(events * max(max_messages, 5) // 5 + 1):  # 5 messages a transaction
        for direction, reads in transaction_reads(aid * 7919):
            items.append((chain.session_id, "frames", {"direction": direction, "messages": message_records(reads)}, ts))
            ts += 40
    return [chain.event(kind, body, ts_micros=ts).envelope
            for _, kind, body, ts in fold(items, max_messages=max_messages)[:events]]


def cpu_per_call(encode: Callable[[dict[str, Any]], bytes], batch: list[dict[str, Any]]) -> float:
    """CPU seconds per envelope for one pass over `batch`."""
    start = time.process_time()
    for envelope in batch:
        encode(envelope)
    return (time.process_time() - start) / len(batch)


def measure(batch: list[dict[str, Any]], rounds: int) -> tuple[float, float]:
    """Best-of-`rounds` CPU seconds per envelope: fastavro's, then envelope_writer's, alternating."""
    for envelope in batch:
        if encode_envelope(envelope) != ENVELOPE.encode(envelope):
            raise SystemExit(f"bytes differ for event seq {envelope['seq']}")
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, encode in enumerate((ENVELOPE.encode, encode_envelope)):
            best[i] = min(best[i], cpu_per_call(encode, batch))
    return best[0], best[1]


def report(title: str, batch: list[dict[str, Any]], rounds: int) -> None:
    """The heading, a row per encoder (µs per message, per event), and their ratio."""
    per_event = sum(len(e["body"][1]["messages"]) for e in batch) / len(batch)
    fastavro_s, ours_s = measure(batch, rounds)
    print(f"{title} ({per_event:.1f} messages an event), CPU µs  per message  per event")
    print(f"  custody envelope_writer  {ours_s * 1e6 / per_event:.2f}  {ours_s * 1e6:.1f}")
    print(f"  fastavro schemaless_writer  {fastavro_s * 1e6 / per_event:.2f}  {fastavro_s * 1e6:.1f}")
    print(f"fastavro / envelope_writer: {fastavro_s / ours_s:.2f}x the CPU (bytes equal on all {len(batch)} events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events of each shape")
    parser.add_argument("--messages", type=int, default=40, help="messages of a folded event")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    report(f"{args.events} Frames events of pgbench reads folded up to {args.messages} messages",
           envelopes(args.events, args.messages), args.rounds)
    report(f"{args.events} Frames events of one pgbench read each, unfolded", envelopes(args.events, 1), args.rounds)


if __name__ == "__main__":
    main()

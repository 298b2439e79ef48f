"""`custody demo`: the whole pipeline on embedded defaults, as far as it is built.

Starts the dev broker, records a few sessions as signed events through the spool
and producer, tampers with one on the wire, then consumes and verifies
everything and shows what was accepted and what was quarantined, and why.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from custody.config import KafkaSettings
from ingest import kafka
from ingest.broker import DevBroker
from ingest.consumer import Accepted, EventConsumer, Quarantined
from ingest.events import SessionChain
from ingest.keys import add_to_keyring, generate_key_file
from ingest.producer import EventProducer
from ingest.spool import Spool
from ingest.verify import EventVerifier

SCRIPT = [
    ("alice@example.com", ["dba"], ["SELECT count(*) FROM orders", "UPDATE orders SET status = 'shipped' WHERE id = 7"]),
    ("ci-runner@example.com", ["ci"], ["SELECT version()", "SELECT * FROM pg_stat_activity"]),
    ("bob@example.com", ["analyst"], ["SELECT email FROM customers LIMIT 5", "SELECT 1/0"]),
]


def _record_session(chain: SessionChain, subject: str, groups: list[str], statements: list[str]):
    identity = {"subject": subject, "username": subject, "email": subject, "groups": groups,
                "issuer": "https://idp.example.com/", "token_id": None}
    yield chain.event("session_start", {"identity": identity, "source_address": "127.0.0.1:52000",
                                        "target": "local-postgres", "upstream": "127.0.0.1:5432/postgres",
                                        "protocol": "postgres", "client_application": "psql"})
    for sql in statements:
        query = b"Q" + (len(sql) + 5).to_bytes(4, "big") + sql.encode() + b"\0"
        yield chain.event("frames", {"direction": "client", "messages": [{"type": "Query", "data": query, "statement": sql}]})
        tag = "ERROR" if "1/0" in sql else ("UPDATE 1" if sql.startswith("UPDATE") else "SELECT 1")
        reply = {"type": "CommandComplete", "data": b"C", "command_tag": tag, "rows": 1}
        if tag == "ERROR":
            reply = {"type": "ErrorResponse", "data": b"E", "error_code": "22012", "error_message": "division by zero"}
        yield chain.event("frames", {"direction": "server", "messages": [reply]})
    yield chain.event("session_end", {"reason": "client_terminate", "duration_us": 42_000, "client_bytes": 120,
                                      "server_bytes": 480, "client_messages": len(statements) + 1,
                                      "server_messages": len(statements) * 2})


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work directory (default: a new temporary one).")
def demo(directory: Path | None) -> None:
    """Run the pipeline end to end on embedded defaults and show what was verified."""
    console = Console()
    directory = directory or Path(tempfile.mkdtemp(prefix="custody-demo-"))
    key = generate_key_file(directory / "keys" / "proxy.key", "proxy")
    keyring = add_to_keyring(directory / "keys" / "keyring.toml", key, "proxy")
    console.print(f"[bold]custody demo[/] in {directory}: proxy key {key.key_id}")
    with DevBroker(log_path=directory / "broker.log") as dev:
        settings = KafkaSettings(bootstrap=dev.bootstrap, topic_prefix="custody.", embedded_listen=dev.bootstrap, partitions=3)
        kafka.ensure_topics(settings)
        console.print(f"dev broker (Tansu) on {dev.bootstrap}")
        producer = EventProducer(settings, Spool(directory / "spool"))
        events = []
        for subject, groups, statements in SCRIPT:
            for event in _record_session(SessionChain(key, "demo-proxy"), subject, groups, statements):
                producer.send(event)
                events.append(event)
        producer.close()
        console.print(f"recorded {len(events)} signed events in {len(SCRIPT)} sessions, spooled and delivered")

        tampered = bytearray(events[1].value)
        tampered[tampered.index(b"orders")] ^= 0x20
        raw = kafka.producer(settings)
        raw.send(settings.topic("events"), key=events[1].session_id.encode(), value=bytes(tampered))
        raw.flush()
        raw.close()
        console.print("tampered with one copy on the wire ('orders' -> 'Orders')")

        consumer = EventConsumer(settings, EventVerifier(keyring), group_id="custody-demo")
        outcomes, deadline = [], time.monotonic() + 30
        while len(outcomes) < len(events) + 1 and time.monotonic() < deadline:
            outcomes.extend(consumer.poll(0.5))
        consumer.commit()
        consumer.close()

    table = Table(title="verified events by session")
    for column in ("session", "identity", "accepted", "statements"):
        table.add_column(column)
    by_session: dict[str, list] = {}
    for outcome in outcomes:
        if isinstance(outcome, Accepted):
            by_session.setdefault(outcome.event.session_id, []).append(outcome.event)
    for session_id, accepted in by_session.items():
        start = accepted[0].body
        statements = [m["statement"] for e in accepted if e.kind == "frames" for m in e.body["messages"] if m["statement"]]
        table.add_row(session_id[:13] + "…", start["identity"]["subject"], str(len(accepted)), "; ".join(statements))
    console.print(table)
    for outcome in outcomes:
        if isinstance(outcome, Quarantined):
            console.print(f"[red]quarantined[/] {outcome.record.topic}/{outcome.record.partition}@{outcome.record.offset}: "
                          f"{outcome.rejection.reason}: {outcome.rejection.detail}")
    accepted_count = sum(isinstance(o, Accepted) for o in outcomes)
    console.print(f"[bold]{accepted_count}/{len(events)} events verified[/] (signature, key, session chain); "
                  f"{len(outcomes) - accepted_count} quarantined")
    if accepted_count != len(events):
        raise SystemExit(1)

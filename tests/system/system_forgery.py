"""Forgery and replay while the system runs: messages a producer that is not the proxy writes into the events
topic. Each must be quarantined with its reason, reported as a violation, and be nowhere in the sealed evidence.

  * a whole session signed by a key the keyring does not trust            -> unknown_key (x3)
  * a sealed event re-sent as it is (a replay)                             -> duplicate, or seq_conflict once
                                                                             it is older than the verifier's
                                                                             duplicate window (both rejected)
  * the same event with its statement altered, its signature kept           -> bad_signature
  * the same event under another session's Kafka key (copied into it)      -> key_mismatch

Afterwards, on a copy of the sealed ledger: a segment's byte flipped and a seal file swapped between
partitions, each named by `custody verify` (non-zero exit).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nacl.signing import SigningKey

from events_factory import frames, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import PrivateKey, key_id_for
from system_stack import SystemStack, custody, wait_for

EXPECTED = {"unknown_key": 3, "replay": 1, "bad_signature": 1, "key_mismatch": 1}
REPLAY = {"duplicate", "seq_conflict"}


def inject(stack: SystemStack) -> dict[str, object]:
    """Write the forgeries into `custody.events`; what was forged, for the checks after the run."""
    settings = stack.config.kafka
    signing = SigningKey.generate()
    intruder = PrivateKey(key_id_for("intruder", bytes(signing.verify_key)), signing)
    chain = SessionChain(intruder, "intruder-proxy")
    forged = [chain.event("session_start", session_start("mallory@example.com")),
              chain.event("frames", frames("SELECT 'forged'")),
              chain.event("session_end", session_end())]
    # The PostgreSQL sessions' partitions may have just changed hands (the worker fault before this one): nothing
    # of them is sealed until their new owner's first seal (CI, once: the worker that took them over lost them
    # again to the restarted one before its first seal, which came about a second after this looked).
    query = ("SELECT session_id, event_id, event FROM events WHERE kind = 'frames' AND protocol = 'postgres' AND "
             "statement LIKE 'INSERT INTO%' ORDER BY ts LIMIT 1")
    rows: list = []

    def sealed_insert() -> bool:
        rows[:] = stack.sealed_query(query)
        return bool(rows)

    assert wait_for(sealed_insert, 60, 0.5), "no sealed PostgreSQL INSERT to copy within 60 s"
    session_id, event_id, value = rows[0]
    other = stack.sealed_query(f"SELECT session_id FROM events WHERE session_id <> '{session_id}' LIMIT 1")[0][0]
    assert b"INSERT INTO" in value
    altered = value.replace(b"INSERT INTO", b"DELETE FROM", 1)
    items = [(e.session_id.encode(), e.value) for e in forged]
    items += [(session_id.encode(), value), (session_id.encode(), altered), (other.encode(), value)]
    producer = kafka.producer(settings)
    for key, message in items:
        producer.send(settings.topic("events"), key=key, value=message)
    producer.flush()
    producer.close()
    return {"forged_session": chain.session_id, "copied_event": event_id, "copied_session": session_id,
            "altered": altered}


def check(stack: SystemStack, forged: dict[str, object], documents: list[dict]) -> list[str]:
    """Problems: what the ledger let in, and what it did not report. Replays beyond the forged one are a
    producer's re-deliveries (a new producer after a broker hang past its delivery timeout sends again what the
    broker had taken): each must be a copy of an event sealed exactly once."""
    problems, quarantine = [], by_reason(documents)
    forged_only = {reason: n for reason, n in quarantine.items() if reason != "replay"}
    if forged_only != {reason: n for reason, n in EXPECTED.items() if reason != "replay"} \
            or quarantine.get("replay", 0) < EXPECTED["replay"]:
        problems.append(f"quarantine violations {quarantine}, forged {EXPECTED}")
    for event_id in (d["event_id"] for d in documents if d["reason"] in REPLAY):
        if stack.sql(f"SELECT count(*) AS n FROM events WHERE event_id = '{event_id}'")[0]["n"] != 1:
            problems.append(f"a replayed event {event_id} is not sealed exactly once")
    if stack.sql(f"SELECT count(*) AS n FROM events WHERE session_id = '{forged['forged_session']}'")[0]["n"]:
        problems.append("the untrusted key's session is in the sealed evidence")
    copies = stack.sql(f"SELECT count(*) AS n FROM events WHERE event_id = '{forged['copied_event']}'")[0]["n"]
    if copies != 1:
        problems.append(f"the copied event is sealed {copies} times")
    if stack.sql("SELECT count(*) AS n FROM events WHERE statement LIKE 'DELETE FROM%'")[0]["n"]:
        problems.append("the altered event is in the sealed evidence")
    quarantined = stack.sql("SELECT coalesce(sum(quarantined), 0) AS n FROM seals")[0]["n"]
    if quarantined != sum(quarantine.values()):
        problems.append(f"seals count {quarantined} quarantined, the violations {sum(quarantine.values())}")
    return problems



def quarantine_documents(stack: SystemStack) -> list[dict]:
    """The quarantine violations as the SOC reads them (`custody violations tail`)."""
    result = custody("violations", "tail", "--format", "json", "--config", str(stack.config_path), timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in map(json.loads, result.stdout.splitlines()) if d.get("category") == "quarantine"]


def by_reason(documents: list[dict]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for document in documents:
        reason = "replay" if document["reason"] in REPLAY else document["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def tamper_checks(stack: SystemStack, work: Path) -> dict[str, str]:
    """`custody verify` on copies of the sealed ledger: one with a flipped segment byte, one with two partitions'
    seals swapped. Each must fail and name what is wrong; the untouched original stays clean."""
    out = {}
    flipped = work / "tampered-segment"
    shutil.copytree(stack.ledger_dir, flipped)
    segment = sorted((flipped / "segments").glob("p*/*.parquet"))[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01
    segment.write_bytes(bytes(data))
    out["segment"] = _verify(stack, flipped)

    swapped = work / "swapped-seals"
    shutil.copytree(stack.ledger_dir, swapped)
    seals = sorted((swapped / "seals").iterdir())
    a, b = seals[0] / "000001.json", seals[1] / "000001.json"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    out["seals"] = _verify(stack, swapped)
    return out


def _verify(stack: SystemStack, ledger: Path) -> str:
    result = custody("verify", "--config", str(stack.config_path), "--ledger", str(ledger))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return f"exit {result.returncode}: " + " | ".join(lines[:3] + lines[-1:])[:700]

"""Sealed bundles: export from a real ledger, verify offline, and catch every tampering."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_inprocess import custody
from conftest import make_key
from events_factory import ALL_KINDS, frames, result_frames, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ingest.settings import KafkaSettings
from ledger import merkle
from ledger.seals import Seal
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from query import dsse
from query.bundle import Scope, _covering, export_bundle, transfer
from query.bundle_format import EVENTS, MANIFEST
from query.bundle_verify import verify_bundle


class Evidence:
    """One real ledger (broker -> ledger service -> sealed segments) and the keys around it."""

    def __init__(self, root: Path, settings: KafkaSettings):
        self.proxy, self.ledger, self.exporter = make_key("proxy"), make_key("ledger"), make_key("exporter")
        self.keyring = Keyring([TrustedKey(k.key_id, role, k.public_key) for k, role in
                                ((self.proxy, "proxy"), (self.ledger, "ledger"), (self.exporter, "exporter"))])
        self.trust = root / "trust.toml"
        self.keyring.save(self.trust)
        self.dir = root / "ledger"
        self.sessions: dict[str, list] = {}
        events = []
        for subject, statements, ended in (("alice@example.com", 4, True), ("bob@example.com", 3, True),
                                           ("alice@example.com", 2, False)):
            chain = SessionChain(self.proxy, "proxy-1")
            mine = [chain.event("session_start", session_start(subject))]
            for i in range(statements):
                mine += [chain.event("frames", frames(f"SELECT '{subject}-secret-{i}'")), chain.event("frames", result_frames(i))]
            if ended:
                mine.append(chain.event("session_end", session_end()))
            self.sessions[chain.session_id] = mine
            events += mine
        kafka.ensure_topics(settings, ("events",))
        producer = kafka.producer(settings)
        for e in events:
            producer.send(settings.topic("events"), key=e.session_id.encode(), value=e.value)
        producer.flush()
        producer.close()
        ledger = LedgerSettings(dir=self.dir, origin="custody.test/ledger", segment_max_events=7,
                                segment_max_bytes=1 << 24, segment_max_seconds=0.2, idle_seal_seconds=3600)
        # pinned to every partition: the same sealing without the dev broker's ~3 s group join
        service = LedgerService(settings, ledger, self.ledger, self.keyring, group_id="bundle-test",
                                partitions=list(range(settings.partitions)))
        deadline = time.monotonic() + 30
        while service.sealed_leaves < len(events) or any(w.opened_at is not None for w in service.writers.values()):
            assert time.monotonic() < deadline, "ledger did not seal everything"
            service.step(0.1)
        service.close()
        self.alice, self.bob, self.open_session = list(self.sessions)

    def export(self, out: Path, scope: Scope, **overrides) -> dict:
        options = dict(case="CASE-123", purpose="audit", recipient="auditor@example.com",
                       exporter_key=self.exporter, keyring=self.keyring, origin="custody.test/ledger")
        return export_bundle(self.dir, out, scope, **{**options, **overrides})


_BUILT: dict[str, Evidence] = {}
"""The one Evidence of a run: test_bundle_states imports the fixture, and pytest keeps an imported fixture's value
per module, so without this the ledger would be produced and sealed twice. No test changes the ledger or the keys
(a test that needs an altered ledger copies it), so sharing it cannot couple tests."""


@pytest.fixture(scope="module")
def evidence(broker, tmp_path_factory) -> Evidence:
    if broker.bootstrap not in _BUILT:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"b{uuid.uuid4().hex[:8]}.",
                                 embedded_listen=broker.bootstrap, partitions=2)
        _BUILT[broker.bootstrap] = Evidence(tmp_path_factory.mktemp("evidence"), settings)
    return _BUILT[broker.bootstrap]


@pytest.fixture
def bundle(evidence, tmp_path) -> Path:
    out = tmp_path / "case.custody"
    evidence.export(out, Scope(sessions=(evidence.alice,)))
    return out


def problems(path: Path, keyring: Keyring) -> list[str]:
    return verify_bundle(path, keyring).problems


def rewrite(path: Path, change) -> None:
    """Rewrite the archive with `change(files)` applied to {name: bytes}."""
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    change(files)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def edit_events(files: dict, edit) -> None:
    table = pq.read_table(io.BytesIO(files[EVENTS]))
    rows = table.to_pylist()
    edit(rows)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), sink)
    files[EVENTS] = sink.getvalue()


def test_a_clean_bundle_verifies_offline(evidence, bundle):
    report = verify_bundle(bundle, evidence.keyring)
    assert report.problems == []
    n = len(evidence.sessions[evidence.alice])
    assert report.events_total == report.events_valid == n
    assert report.sessions_complete == 1 and report.manifest_signer == evidence.exporter.key_id
    assert report.predicate["case"] == "CASE-123" and report.predicate["scope"] == {"sessions": [evidence.alice]}
    assert report.predicate["exporter"]["key_id"] == evidence.exporter.key_id and "@" in report.predicate["exporter"]["identity"]
    assert report.summary().startswith(f"{n}/{n} events valid, ")
    assert f"{report.checkpoints_valid}/{report.checkpoints_total} checkpoints valid" in report.summary()


def test_covering_seals_are_those_holding_the_events_plus_the_newest():
    def seal(number: int, first: int, count: int) -> Seal:
        return Seal({"number": number, "leaves": {"first": first, "count": count}}, b"", b"", ())

    chain = [seal(1, 0, 5), seal(2, 5, 0), seal(3, 5, 4), seal(4, 9, 3), seal(5, 12, 0)]  # 2 and 5: idle seals
    assert [s.number for s in _covering(chain, [0, 4])] == [1, 5]
    assert [s.number for s in _covering(chain, [5, 11, 8])] == [3, 4, 5]
    assert [s.number for s in _covering(chain[:4], [9])] == [4]


def test_the_cli_verifies_with_verbose_proof_steps_and_exit_codes(evidence, bundle):
    ok = custody("bundle", "verify", str(bundle), "--trust", str(evidence.trust), "--verbose")
    assert ok.returncode == 0, ok.stderr
    assert "SHA256(0x01 | " in ok.stdout and "events valid" in ok.stdout.splitlines()[-1]
    (bundle.parent / "t.bin").write_bytes(bundle.read_bytes()[:-100])
    # the failing verdict as a real process's exit status (the clean one: tests/test_cli_exit.py)
    bad = subprocess.run([sys.executable, "-m", "custody", "bundle", "verify", str(bundle.parent / "t.bin"), "--trust",
                          str(evidence.trust)], capture_output=True, text=True)
    assert bad.returncode == 1 and "INVALID: truncated" in bad.stdout


def test_identity_scope_takes_whole_sessions_and_marks_open_ones(evidence, tmp_path):
    out = tmp_path / "alice.custody"
    predicate = evidence.export(out, Scope(identity="alice@example.com"))
    assert set(predicate["sessions"]) == {evidence.alice, evidence.open_session}
    assert predicate["sessions"][evidence.open_session]["open"] is True
    report = verify_bundle(out, evidence.keyring)
    assert report.problems == [] and report.sessions_complete == 1 and report.sessions_open == 1


def test_selective_disclosure_nothing_of_other_sessions_anywhere_in_the_file(evidence, bundle):
    data = bundle.read_bytes()
    with zipfile.ZipFile(bundle) as archive:
        everything = data + b"".join(archive.read(n) for n in archive.namelist())  # also inside compressed members
        events = pq.read_table(io.BytesIO(archive.read(EVENTS)))
    assert set(events.column("session_id").to_pylist()) == {evidence.alice}
    for needle in (evidence.bob.encode(), b"bob@example.com", b"bob@example.com-secret-0", b"bob@example.com-secret-2"):
        assert needle not in everything
    for event in evidence.sessions[evidence.bob]:
        assert event.value not in everything and event.event_id.encode() not in everything


@pytest.mark.parametrize("tamper, expected", [
    ("changed_byte", "bad_signature: signature by"),
    ("removed_event", "seq 3 is missing"),
    ("swapped_events", "events out of order"),
    ("spliced_event", "is not in the manifest"),
    ("edited_manifest", "Manifest INVALID: signature by"),
    ("added_file", "File notes.txt INVALID: not listed in the manifest"),
    ("removed_file", "File consistency.json INVALID: listed in the manifest but missing"),
    ("untrusted_resign", "unknown_key"),
    ("bad_checkpoint_signature", "INVALID: "),
    ("wrong_tree_size", "inclusion proof is for tree size"),
    ("truncated", "INVALID: truncated or not a bundle archive"),
    ("wrong_trust", "Manifest INVALID: no signature by a trusted exporter key"),
])
def test_every_tampering_is_caught_with_its_own_message(evidence, bundle, tmp_path, tamper, expected):
    keyring = evidence.keyring
    if tamper == "changed_byte":
        def change(rows):
            event = bytearray(rows[1]["event"])
            event[event.index(b"secret")] ^= 0x01
            rows[1]["event"] = bytes(event)
        rewrite(bundle, lambda files: edit_events(files, change))
    elif tamper == "removed_event":
        rewrite(bundle, lambda files: edit_events(files, lambda rows: rows.pop(3)))
    elif tamper == "swapped_events":
        rewrite(bundle, lambda files: edit_events(files, lambda rows: rows.__setitem__(slice(2, 4), [rows[3], rows[2]])))
    elif tamper == "spliced_event":
        other = tmp_path / "other.custody"
        evidence.export(other, Scope(sessions=(evidence.bob,)))
        with zipfile.ZipFile(other) as archive:
            foreign = pq.read_table(io.BytesIO(archive.read(EVENTS))).to_pylist()[2]
        rewrite(bundle, lambda files: edit_events(files, lambda rows: rows.insert(4, foreign)))
    elif tamper == "edited_manifest":
        def change(files):
            envelope = json.loads(files[MANIFEST])
            statement = json.loads(__import__("base64").b64decode(envelope["payload"]))
            statement["predicate"]["purpose"] = "something else"
            envelope["payload"] = __import__("base64").b64encode(json.dumps(statement).encode()).decode()
            files[MANIFEST] = json.dumps(envelope).encode()
        rewrite(bundle, change)
    elif tamper == "added_file":
        rewrite(bundle, lambda files: files.__setitem__("notes.txt", b"planted"))
    elif tamper == "removed_file":
        rewrite(bundle, lambda files: files.pop("consistency.json"))
    elif tamper == "untrusted_resign":
        stranger = make_key("proxy")
        def change(rows):
            chain = SessionChain(stranger, "proxy-1", session_id=evidence.alice)
            for row in rows:
                event = chain.event(row["kind"], ALL_KINDS[row["kind"]])
                row["event"], row["event_hash"], row["event_id"] = event.value, event.hash, event.event_id
        rewrite(bundle, lambda files: edit_events(files, change))
    elif tamper == "bad_checkpoint_signature":
        def change(files):
            name = sorted(n for n in files if n.startswith("seals/"))[-1]
            seal = json.loads(files[name])
            body, _, sig_line = seal["checkpoint"].rpartition("\n\n")
            name_part, _, sig = sig_line.strip().rpartition(" ")
            raw = bytearray(__import__("base64").b64decode(sig))
            raw[-1] ^= 1
            seal["checkpoint"] = f"{body}\n\n{name_part} {__import__('base64').b64encode(bytes(raw)).decode()}\n"
            files[name] = json.dumps(seal).encode()
        rewrite(bundle, change)
        expected = "Checkpoint of seals/"
    elif tamper == "wrong_tree_size":
        def change(rows):
            rows[1]["tree_size"] = rows[1]["tree_size"] - 1
        rewrite(bundle, lambda files: edit_events(files, change))
    elif tamper == "truncated":
        bundle.write_bytes(bundle.read_bytes()[: len(bundle.read_bytes()) // 2])
    elif tamper == "wrong_trust":
        keyring = Keyring([k for k in evidence.keyring if k.role != "exporter"] +
                          [TrustedKey((k := make_key("exporter")).key_id, "exporter", k.public_key)])
    found = problems(bundle, keyring)
    assert any(expected in p for p in found), found


def verify_lines(path: Path, keyring: Keyring, jobs: int, trace: bool = False) -> tuple[list[str], str, bool, list[str]]:
    steps: list[str] = []
    report = verify_bundle(path, keyring, trace=steps.append if trace else None, jobs=jobs)
    return report.problems, report.summary(), report.ok, steps


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 events, so that a test bundle is several chunks and --jobs 2 really uses two workers."""
    import query.bundle_verify
    monkeypatch.setattr(query.bundle_verify, "CHUNK_EVENTS", 3)


def test_jobs_1_and_jobs_2_give_the_same_report_and_proof_steps(evidence, tmp_path, small_chunks):
    out = tmp_path / "alice.custody"
    evidence.export(out, Scope(identity="alice@example.com"))
    one, two = verify_lines(out, evidence.keyring, 1, trace=True), verify_lines(out, evidence.keyring, 2, trace=True)
    assert one == two
    assert one[0] == [] and one[2] and "SHA256(0x01 | " in "".join(one[3])


def test_a_tampered_event_is_reported_the_same_way_by_jobs_1_and_2(evidence, bundle, small_chunks):
    def change(rows):
        for index in (1, 7):  # two chunks apart
            event = bytearray(rows[index]["event"])
            event[event.index(b"secret")] ^= 0x01
            rows[index]["event"] = bytes(event)
        rows[4]["tree_size"] -= 1
        rows[5]["event"] = b"not avro"
    rewrite(bundle, lambda files: edit_events(files, change))
    one, two = verify_lines(bundle, evidence.keyring, 1), verify_lines(bundle, evidence.keyring, 2)
    assert one == two
    problems, summary, ok, _ = one
    assert not ok and summary.startswith("6/10 events valid")
    events = [p for p in problems if p.startswith("Event ")]
    assert [p.split(" INVALID: ")[1].split(" ")[0] for p in events] == [
        "bad_signature:", "inclusion", "signed", "bad_signature:"]
    assert "inclusion proof is for tree size" in events[1] and "signed bytes do not decode" in events[2]
    assert any(p.startswith("Session ") and "INCOMPLETE" in p for p in problems)


def test_the_cli_takes_jobs(evidence, bundle):
    runs = [custody("bundle", "verify", str(bundle), "--trust", str(evidence.trust), "--jobs", jobs) for jobs in ("1", "2")]
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stderr == runs[1].stderr == ""
    zero = custody("bundle", "verify", str(bundle), "--trust", str(evidence.trust), "--jobs", "0")
    assert zero.returncode == 2 and "--jobs" in zero.stderr


def test_transfers_extend_the_chain_of_custody_without_breaking_signatures(evidence, bundle):
    transfer(bundle, to="external-auditor@example.com", reason="annual audit", key=evidence.exporter, by="compliance")
    transfer(bundle, to="court-clerk", reason="subpoena 42", key=evidence.exporter)
    report = verify_bundle(bundle, evidence.keyring)
    assert report.problems == []
    assert [(t["sequence"], t["to"]) for t in report.transfers] == [(1, "external-auditor@example.com"), (2, "court-clerk")]
    rewrite(bundle, lambda files: files.pop("custody/transfer-0001.dsse.json"))
    assert any("does not link" in p for p in problems(bundle, evidence.keyring))


def test_dsse_pae_matches_the_spec_example():
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_an_auditor_reads_the_bundle_with_sql_sessions_and_replay(evidence, bundle):
    listed = custody("sessions", "--bundle", str(bundle), "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [s["session_id"] for s in json.loads(listed.stdout)] == [evidence.alice]
    counted = custody("sql", "--bundle", str(bundle), "--format", "csv",
                      "SELECT count(*) AS n, count(DISTINCT session_id) AS s FROM events")
    assert counted.stdout.splitlines()[1] == f"{len(evidence.sessions[evidence.alice])},1"
    story = custody("replay", evidence.alice, "--bundle", str(bundle), "--keyring", str(evidence.trust))
    assert story.returncode == 0, story.stderr
    assert story.stdout.startswith(f"VERIFIED session {evidence.alice}")
    assert "alice@example.com-secret-3" in story.stdout
    refused = custody("sql", "--bundle", str(bundle), "COPY events TO '/tmp/x.csv'")
    assert refused.returncode == 2 and "read-only" in refused.stderr


# Each event goes the fast way first (query/bundle_verify.py: EventChecks.passes, sessions on whole columns) and the
# exact way only when it does not pass; tracing sends every event the exact way. The two must report the same.

def both_ways(path: Path, keyring: Keyring) -> tuple[list[str], str]:
    """(problems, summary), the same from the fast way in 2 workers and the exact way (traced) in this process."""
    fast = verify_bundle(path, keyring, jobs=2)
    exact = verify_bundle(path, keyring, trace=[].append)
    assert (fast.problems, fast.summary()) == (exact.problems, exact.summary())
    return fast.problems, fast.summary()


def test_an_audit_path_sharing_nodes_with_a_proven_one_must_still_end_in_its_own_hashes(evidence, bundle):
    """Paths of neighbouring events meet below the root; where one event's path reaches a node another's took to
    the root, the hashes left must be the same too, or the event fails as the exact way says."""
    def change(rows):
        for row in rows[1:]:
            row["inclusion_proof"][-1] = bytes(32)
    rewrite(bundle, lambda files: edit_events(files, change))
    found, summary = both_ways(bundle, evidence.keyring)
    events = [p for p in found if p.startswith("Event ")]
    assert summary.startswith("1/10 events valid")
    assert len(events) == 9 and all(" INVALID: inclusion proof fails: recomputed root " in p for p in events)


def test_a_bad_signature_found_by_a_worker_is_reported_with_its_event(evidence, bundle, small_chunks):
    def change(rows):
        event = bytearray(rows[7]["event"])
        event[event.index(b"secret")] ^= 0x01
        rows[7]["event"] = bytes(event)
    rewrite(bundle, lambda files: edit_events(files, change))
    found, _ = both_ways(bundle, evidence.keyring)
    event = evidence.sessions[evidence.alice][7]
    assert found[1] == (f"Event {event.event_id} (session {evidence.alice} seq 7) INVALID: bad_signature: "
                        f"signature by {evidence.proxy.key_id} does not verify")


def test_the_proxy_key_signs_from_its_not_before_to_its_not_after_to_the_microsecond(evidence, bundle):
    events = evidence.sessions[evidence.alice]
    first, last = events[2].ts + timedelta(microseconds=1), events[6].ts - timedelta(microseconds=1)
    keyring = Keyring([TrustedKey(k.key_id, k.role, k.public_key, not_before=first, not_after=last)
                       if k.role == "proxy" else k for k in evidence.keyring])
    found, _ = both_ways(bundle, keyring)
    reasons = [p.split(" INVALID: ")[1].split(":")[0] for p in found if p.startswith("Event ")]
    assert reasons == ["key_not_yet_valid" if e.ts < first else "key_revoked" for e in events
                       if not first <= e.ts <= last]
    assert "key_revoked" in reasons and "key_not_yet_valid" in reasons


def test_sessions_in_more_than_one_run_of_rows_verify_as_the_exact_way_says(evidence, tmp_path):
    """Each session one run of rows is the fast way's case; interleaved rows are whole sessions all the same, and a
    session's rows repeated after another session's are one session with every seq twice."""
    out = tmp_path / "alice.custody"
    evidence.export(out, Scope(identity="alice@example.com"))
    def interleave(rows):
        first = [r for r in rows if r["session_id"] == rows[0]["session_id"]]
        other = [r for r in rows if r["session_id"] != rows[0]["session_id"]]
        rows[:] = [r for pair in zip(first, other) for r in pair] + first[len(other):] + other[len(first):]
    rewrite(out, lambda files: edit_events(files, interleave))
    found, summary = both_ways(out, evidence.keyring)
    assert found == ["File events.parquet INVALID: hash value doesn't match the manifest"]
    assert "1 sessions complete (1 open at export)" in summary

    def repeat_first_session(rows):
        rows += [r for r in rows if r["session_id"] == rows[0]["session_id"]]
    evidence.export(out, Scope(identity="alice@example.com"))
    rewrite(out, lambda files: edit_events(files, repeat_first_session))
    found, _ = both_ways(out, evidence.keyring)
    assert any(p.endswith("INCOMPLETE: seq 0 appears twice") for p in found), found


def test_an_events_file_without_a_column_the_checks_read_is_one_line(evidence, bundle):
    def drop_salt(files):
        sink = io.BytesIO()
        pq.write_table(pq.read_table(io.BytesIO(files[EVENTS])).drop_columns(["salt"]), sink)
        files[EVENTS] = sink.getvalue()
    rewrite(bundle, drop_salt)
    assert "File events.parquet INVALID: not readable Parquet (ValueError: no column salt)" in problems(
        bundle, evidence.keyring)


@pytest.mark.parametrize("column, line", [("event", "INVALID: the event column is empty (null)"),
                                          ("salt", "INVALID: salt is missing, expected 32 bytes"),
                                          ("leaf_index", "INVALID: leaf_index is missing (null)"),
                                          ("inclusion_proof", "INVALID: inclusion_proof is missing (null)")])
def test_a_null_cell_is_one_line_not_a_crash(evidence, bundle, column, line):
    """A bundle written by another tool may hold nulls where Custody writes values: the fast way crashed with a
    TypeError on them; each must be the row's INVALID line, the same both ways."""
    def null_one(files):
        table = pq.read_table(io.BytesIO(files[EVENTS]))
        rows = table.to_pylist()
        rows[1][column] = None
        schema = pa.schema([field.with_nullable(True) for field in table.schema])
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
        files[EVENTS] = sink.getvalue()
    rewrite(bundle, null_one)
    found, _ = both_ways(bundle, evidence.keyring)
    assert any(problem.endswith(line) for problem in found), found


def test_a_salt_of_the_wrong_length_is_one_line_not_a_crash(evidence, bundle):
    def shorten_salt(files):  # a file whose salt column is of variable length, one salt cut short
        table = pq.read_table(io.BytesIO(files[EVENTS]))
        index = table.schema.get_field_index("salt")
        salts = table.column("salt").to_pylist()
        salts[1] = salts[1][:5]
        sink = io.BytesIO()
        pq.write_table(table.set_column(index, pa.field("salt", pa.binary()), pa.array(salts, pa.binary())), sink)
        files[EVENTS] = sink.getvalue()
    rewrite(bundle, shorten_salt)
    found = problems(bundle, evidence.keyring)
    assert any("INVALID: salt is 5 bytes, expected 32 bytes" in line for line in found), found

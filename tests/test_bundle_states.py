"""Provable session state in bundles (issue 16, item 3): the exporter's key alone cannot drop a session's tail.

Each seal signs the root of the map of every session's state (last seq, last event hash, ended), and states it
in its checkpoint for the witnesses to cosign; a bundle carries each session's proof against its partition's
newest seal. The attack: drop a session's last events including its SessionEnd, declare it open at export and
re-sign the manifest with the exporter key.
"""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from cli_inprocess import Ran, custody
from ledger import sessionmap
from ledger.seals import Seal
from query import dsse
from query.bundle import Scope, _statement
from query.bundle_format import EVENTS, MANIFEST, SESSION_STATES
from query.bundle_verify import verify_bundle
from test_bundle import edit_events, evidence, rewrite  # noqa: F401 - the module's real-ledger fixture


def resign(files: dict, exporter, edit_predicate) -> None:
    """What an exporter can do: rewrite the predicate, rehash every file, sign with the exporter key."""
    statement = json.loads(base64.b64decode(json.loads(files[MANIFEST])["payload"]))
    predicate = statement["predicate"]
    edit_predicate(predicate)
    others = {n: d for n, d in files.items() if n != MANIFEST}
    files[MANIFEST] = json.dumps(dsse.sign(_statement(others, predicate), dsse.IN_TOTO_PAYLOAD_TYPE, exporter)).encode()


def truncate(evidence, path: Path, session: str, keep: int, *, drop_proofs: bool = False,
             forge: Callable[[dict], None] | None = None) -> None:
    """The exporter's attack: `session`'s events from seq `keep` on left out, the session declared open at export,
    the manifest re-signed with `evidence.exporter`; `forge(files)` first changes what else the attacker can (a
    re-signed seal with the ledger key, say)."""
    def change(files):
        edit_events(files, lambda rows: rows.__setitem__(slice(None), [r for r in rows if r["session_id"] != session
                                                                       or r["seq"] < keep]))
        if drop_proofs:
            files.pop(SESSION_STATES)
        if forge is not None:
            forge(files)

        def declare_open(predicate):
            predicate["sessions"][session] = {"events": keep, "open": True}
            predicate["counts"]["events"] = sum(s["events"] for s in predicate["sessions"].values())
        resign(files, evidence.exporter, declare_open)
    rewrite(path, change)


def cli_verify(path: Path, trust: Path) -> Ran:
    return custody("bundle", "verify", str(path), "--trust", str(trust), "--jobs", "1")


def test_every_seal_and_checkpoint_commits_to_the_session_states(evidence):
    seals = sorted((Seal.load(p) for p in evidence.dir.glob("seals/p*/*.json")), key=lambda s: (s.partition, s.number))
    for seal in seals:
        stated = seal.record["sessions"]
        text = seal.checkpoint_note.decode().split("\n\n")[0].split("\n")
        assert sessionmap.extension_line(stated) == text[3]  # origin, size, root, then the map's line
    newest = {s.partition: s for s in seals}
    assert sum(s.record["sessions"]["count"] for s in newest.values()) == len(evidence.sessions)


def test_honest_bundles_prove_every_session_state_open_or_ended(evidence, tmp_path):
    out = tmp_path / "all.custody"
    evidence.export(out, Scope(sessions=(evidence.alice, evidence.bob, evidence.open_session)))
    report = verify_bundle(out, evidence.keyring)
    assert report.problems == [], report.problems
    assert report.states_proven == 3 and report.sessions_open == 1 and report.sessions_complete == 2
    assert "3 session states proven" in report.summary()
    with zipfile.ZipFile(out) as archive:
        entries = json.loads(archive.read(SESSION_STATES))
    states = {e["session_id"]: e["proof"]["state"] for e in entries}
    assert states[evidence.open_session]["ended"] is False and states[evidence.alice]["ended"] is True
    assert states[evidence.alice]["last_seq"] == len(evidence.sessions[evidence.alice]) - 1


def test_dropped_tail_declared_open_and_resigned_by_the_exporter_fails(evidence, tmp_path):
    out = tmp_path / "case.custody"
    evidence.export(out, Scope(sessions=(evidence.alice,)))
    last = len(evidence.sessions[evidence.alice]) - 1
    truncate(evidence, out, evidence.alice, keep=5)
    report = verify_bundle(out, evidence.keyring)
    assert report.manifest_signer == evidence.exporter.key_id  # the manifest itself is valid: the exporter signed it
    lines = [p for p in report.problems if p.startswith(f"Session {evidence.alice} INCOMPLETE")]
    assert len(lines) == 1, report.problems
    assert f"proves it ended at seq {last}" in lines[0]
    assert "the bundle ends at seq 4 and declares it open at export" in lines[0]
    assert f"seq 5..{last} left out (the SessionEnd among them)" in lines[0]
    result = cli_verify(out, evidence.trust)
    assert result.returncode == 1 and lines[0] in result.stdout, result.stdout + result.stderr


def test_dropping_the_state_proofs_as_well_fails(evidence, tmp_path):
    out = tmp_path / "case.custody"
    evidence.export(out, Scope(sessions=(evidence.alice,)))
    truncate(evidence, out, evidence.alice, keep=5, drop_proofs=True)
    report = verify_bundle(out, evidence.keyring)
    assert any(p.startswith(f"Session {evidence.alice} INCOMPLETE: no proof of its state") for p in report.problems), \
        report.problems


def test_a_forged_state_in_the_proof_fails(evidence, tmp_path):
    out = tmp_path / "case.custody"
    evidence.export(out, Scope(sessions=(evidence.alice,)))

    def change(files):
        edit_events(files, lambda rows: rows.__setitem__(slice(None), [r for r in rows if r["seq"] < 5]))
        entries = json.loads(files[SESSION_STATES])
        rows = {}
        edit_events(files, lambda r: rows.update({x["seq"]: x for x in r}))
        entries[0]["proof"]["state"] = {"last_seq": 4, "last_hash": rows[4]["event_hash"].hex(), "ended": False}
        files[SESSION_STATES] = json.dumps(entries).encode()
        resign(files, evidence.exporter, lambda p: p["sessions"][evidence.alice].update(events=5, open=True))
    rewrite(out, change)
    report = verify_bundle(out, evidence.keyring)
    assert any(f"Session {evidence.alice} INVALID: state proof against the session-state map of p" in p
               and "does not match the sealed root" in p for p in report.problems), report.problems


def test_an_old_ledger_without_state_maps_still_verifies_with_a_note(evidence, tmp_path):
    """Seals from before session-state maps: the bundle verifies, and says what it cannot prove."""
    out = tmp_path / "old.custody"
    evidence.export(out, Scope(sessions=(evidence.alice,)))
    old = tmp_path / "old-ledger"
    import shutil
    shutil.copytree(evidence.dir, old)
    from ledger.seals import sign_seal
    chains: dict[int, Seal] = {}  # re-sealed as the ledger did before the map existed
    for path in sorted(old.glob("seals/p*/*.json"), key=lambda p: (p.parent.name, p.name)):
        seal = Seal.load(path)
        record = {k: v for k, v in seal.record.items() if k != "sessions"}
        previous = chains.get(seal.partition)
        record["previous"] = previous.link() if previous else {"first_seal": True}
        resealed = sign_seal(record, evidence.ledger, list(seal.consistency_proof))
        path.write_bytes(resealed.to_bytes())
        chains[seal.partition] = resealed
    evidence_dir, evidence.dir = evidence.dir, old
    try:
        evidence.export(out, Scope(sessions=(evidence.alice,)))
    finally:
        evidence.dir = evidence_dir
    report = verify_bundle(out, evidence.keyring)
    assert report.problems == [], report.problems
    assert report.states_proven == 0 and report.sessions_complete == 1
    assert any("from before session-state maps" in n for n in report.notes), report.notes
    result = cli_verify(out, evidence.trust)
    assert result.returncode == 0 and "note: Checkpoint p" in result.stdout, result.stdout + result.stderr
    ledger = custody("verify", "--ledger", str(old), "--keyring", str(evidence.trust))
    assert ledger.returncode == 0 and "note: Partition p" in ledger.stdout, ledger.stdout + ledger.stderr


def test_custody_verify_recomputes_the_session_state_maps(evidence, tmp_path):
    result = custody("verify", "--ledger", str(evidence.dir), "--keyring", str(evidence.trust))
    assert result.returncode == 0 and "note:" not in result.stdout, result.stdout + result.stderr

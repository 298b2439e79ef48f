"""`custody verify` on a real ledger directory: clean when untouched, and each tampering caught by its own message."""

from __future__ import annotations

import re

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import make_key
from custody.cli import cli
from events_factory import frames, session_start
from ingest.consumer import Record
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ledger.seals import Seal, sign_seal
from ledger.service import PartitionWriter
from ledger.settings import LedgerSettings
from ledger.state import recover
from ledger.verify import verify_ledger

ORIGIN = "custody.test/verify"
SEGMENTS, PER_SEGMENT = 3, 24


def build_ledger(root: Path, proxy_key, ledger_key, keyring: Keyring) -> None:
    """Seals written by the ledger's own writer from records as Kafka would deliver them, plus one idle seal."""
    settings = LedgerSettings(dir=root, origin=ORIGIN, segment_max_events=PER_SEGMENT, segment_max_bytes=1 << 24,
                              segment_max_seconds=60.0, idle_seal_seconds=60.0)
    writer = PartitionWriter(root, settings, "t.events", recover(root, 0), keyring, ledger_key)
    chains = [SessionChain(proxy_key, "proxy-1") for _ in range(4)]
    offset = 0
    for _ in range(SEGMENTS):
        for i in range(PER_SEGMENT):
            chain = chains[i % len(chains)]
            event = chain.event("frames", frames(f"SELECT {offset}")) if chain.next_seq else \
                chain.event("session_start", session_start(f"user{i % 4}@example.com"))
            assert writer.add(Record("t.events", 0, offset, event.session_id.encode(), event.value), os.urandom(32)) is None
            offset += 1
        writer.seal()
    writer.seal()  # nothing new: an idle seal


@pytest.fixture(scope="module")
def keys():
    proxy_key, ledger_key = make_key("proxy"), make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    return proxy_key, ledger_key, keyring


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, keys) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "ledger"
    build_ledger(root, *keys)
    return root


@pytest.fixture
def ledger(pristine, tmp_path) -> Path:
    """A fresh copy to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "ledger"))


def problems(ledger: Path, keyring: Keyring) -> list[str]:
    return [p.line for p in verify_ledger(ledger, keyring, ORIGIN).problems]


def rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, compression="zstd")


SEGMENT = "segments/p0/000002.parquet"
SEAL = "seals/p0/000002.json"


def test_an_untouched_ledger_is_valid(ledger, keys):
    report = verify_ledger(ledger, keys[2], ORIGIN)
    assert report.ok, [p.line for p in report.problems]
    total = SEGMENTS * PER_SEGMENT
    assert report.summary() == f"{SEGMENTS}/{SEGMENTS} segments valid, {total}/{total} events valid, " \
                               f"0 session gaps, {SEGMENTS + 1}/{SEGMENTS + 1} seals valid"


def test_the_cli_prints_problems_and_a_summary_and_fails(ledger, keys, tmp_path):
    keys[2].save(tmp_path / "keyring.toml")
    args = ["verify", "--ledger", str(ledger), "--keyring", str(tmp_path / "keyring.toml")]
    clean = CliRunner().invoke(cli, args)
    assert clean.exit_code == 0 and clean.output == "3/3 segments valid, 72/72 events valid, 0 session gaps, 4/4 seals valid\n"
    data = bytearray((ledger / SEGMENT).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ledger / SEGMENT).write_bytes(bytes(data))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"Segment {SEGMENT} INVALID: hash value doesn't match"
    # The flipped byte may also leave rows unreadable, whose sessions then show gaps in the next segment.
    assert re.match(r"[12]/3 segments valid, ", result.output.splitlines()[-1])


def test_flipped_byte_in_a_segment(ledger, keys):
    data = bytearray((ledger / SEGMENT).read_bytes())
    data[100] ^= 0x01
    (ledger / SEGMENT).write_bytes(bytes(data))
    assert f"Segment {SEGMENT} INVALID: hash value doesn't match" in problems(ledger, keys[2])


def test_deleted_row(ledger, keys):
    table = pq.read_table(ledger / SEGMENT)
    rewrite(ledger / SEGMENT, pa.concat_tables([table.slice(0, 5), table.slice(6)]))
    found = problems(ledger, keys[2])
    assert f"Segment {SEGMENT} INVALID: {PER_SEGMENT - 1} rows, the seal covers {PER_SEGMENT} events" in found
    assert any(line.startswith(f"Segment {SEGMENT} INVALID: Merkle root recomputed from the rows") for line in found)
    assert any("seq_gap" in line for line in found)


def test_reordered_rows(ledger, keys):
    table = pq.read_table(ledger / SEGMENT)
    rewrite(ledger / SEGMENT, table.take(list(reversed(range(table.num_rows)))))
    found = problems(ledger, keys[2])
    assert f"Segment {SEGMENT} INVALID: rows are not sorted by (session_id, seq) at row 1" in found
    assert not any("Merkle" in line for line in found), "leaf_index, not row order, gives the tree order"


def test_swapped_leaf_indexes_change_the_root(ledger, keys):
    table = pq.read_table(ledger / SEGMENT)
    indexes = table.column("leaf_index").to_pylist()
    indexes[0], indexes[1] = indexes[1], indexes[0]
    rewrite(ledger / SEGMENT, table.set_column(0, "leaf_index", pa.array(indexes, pa.int64())))
    assert any(line.startswith(f"Segment {SEGMENT} INVALID: Merkle root recomputed from the rows")
               for line in problems(ledger, keys[2]))


def test_deleted_segment(ledger, keys):
    (ledger / SEGMENT).unlink()
    assert f"Segment {SEGMENT} INVALID: file is missing" in problems(ledger, keys[2])


def test_extra_segment(ledger, keys):
    shutil.copy(ledger / SEGMENT, ledger / "segments/p0/000009.parquet")
    assert problems(ledger, keys[2]) == ["Segment segments/p0/000009.parquet INVALID: no seal covers this file"]


def test_deleted_seal(ledger, keys):
    (ledger / SEAL).unlink()
    found = problems(ledger, keys[2])
    assert f"Seal {SEAL} INVALID: file is missing" in found
    assert "Seal seals/p0/000003.json INVALID: previous seal hash or signature doesn't match seal 1" in found


def edit_seal(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_edited_seal(ledger, keys):
    edit_seal(ledger / SEAL, lambda d: d["seal"]["events"].update(quarantined=0 if d["seal"]["events"]["quarantined"] else 5))
    assert problems(ledger, keys[2]) == [f"Seal {SEAL} INVALID: signature by {keys[1].key_id} doesn't verify",
                                         "Seal seals/p0/000003.json INVALID: previous seal hash or signature doesn't match seal 2"]


def test_swapped_checkpoint(ledger, keys):
    other = json.loads((ledger / "seals/p0/000003.json").read_text())["checkpoint"]
    edit_seal(ledger / SEAL, lambda d: d.update(checkpoint=other))
    found = problems(ledger, keys[2])
    assert len(found) == 1 and found[0].startswith(
        f"Seal {SEAL} INVALID: checkpoint states tree size {3 * PER_SEGMENT} root")


def test_tampered_consistency_proof(ledger, keys):
    edit_seal(ledger / SEAL, lambda d: d.update(consistency_proof=[bytes(32).hex()] + d["consistency_proof"][1:]))
    found = problems(ledger, keys[2])
    assert len(found) == 1 and found[0].startswith(f"Seal {SEAL} INVALID: consistency proof from the previous checkpoint")


def test_resigned_with_an_untrusted_key(ledger, keys):
    """A forger rewrites the tree root and re-signs seal and checkpoint with a key of their own."""
    forger = make_key("ledger")
    seal = Seal.load(ledger / SEAL)
    record = {**seal.record, "key_id": forger.key_id, "tree": {**seal.record["tree"], "root": "00" * 32}}
    (ledger / SEAL).write_bytes(sign_seal(record, forger, list(seal.consistency_proof)).to_bytes())
    found = problems(ledger, keys[2])
    assert f"Seal {SEAL} INVALID: signed by untrusted key {forger.key_id} (unknown_key: key {forger.key_id} is not in the keyring)" in found
    assert any(line.startswith(f"Seal {SEAL} INVALID: checkpoint: note has no signature from a trusted key") for line in found)


def test_forged_event_bytes(ledger, keys):
    """An event swapped for one signed by a key the keyring does not trust."""
    table = pq.read_table(ledger / SEGMENT)
    rows = table.to_pylist()
    chain = SessionChain(make_key("proxy"), "proxy-1", session_id=rows[0]["session_id"])
    chain._seq, chain._prev_hash = rows[0]["seq"], rows[0]["prev_hash"]
    forged = chain.event("frames", frames("SELECT 'forged'"))
    rows[0] = {**rows[0], "event": forged.value, "event_hash": forged.hash}
    rewrite(ledger / SEGMENT, pa.Table.from_pylist(rows, schema=table.schema))
    found = problems(ledger, keys[2])
    leaf = rows[0]["leaf_index"]
    assert any(line.startswith(f"Event {SEGMENT} leaf {leaf} INVALID: unknown_key:") for line in found)

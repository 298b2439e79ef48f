"""Witnessed checkpoints and provable session state: what they cost.

Prints, each beside a baseline measured in the same run:

* witness cosignatures/s (`Witness.add`: open the log's signed checkpoint, check the consistency proof, write
  the state durably, cosign), in-process and over HTTP (C2SP add-checkpoint on `ledger.witness.serve`), beside
  the raw Ed25519 verify + sign rate and the durable small-file write rate it is made of;
* the session-state map's cost per sealed event: the ledger's `PartitionWriter` (verify, chain, leaves, rows,
  zstd Parquet, fsync, signed seal; no broker) sealing the same events with the map and with the map update
  skipped, alternated, best of each;
* a session's state proof at scale: size (JSON bytes, sibling hashes) and verify time, present and absent,
  against a map of `--sessions` sessions (the proof depends on the number of sessions, not of events: 1M
  sessions of 10 events each is a 10M-event partition; the RFC 6962 inclusion proofs are bench/bundle.py's).

    .venv/bin/python bench/witness.py [--checkpoints N] [--events N] [--seal-every N] [--sessions N]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from ingest.consumer import Record  # noqa: E402
from ingest.events import SessionChain  # noqa: E402
from ingest.keys import Keyring, PrivateKey, TrustedKey, key_id_for  # noqa: E402
from ledger import checkpoint, merkle, sessionmap  # noqa: E402
from ledger.durable import write_atomic  # noqa: E402
from ledger.merkle import SALT_SIZE  # noqa: E402
from ledger.service import PartitionWriter  # noqa: E402
from ledger.settings import LedgerSettings  # noqa: E402
from ledger.state import recover  # noqa: E402
from ledger.witness import Witness, add_checkpoint_body, serve  # noqa: E402

ORIGIN = "bench.custody/ledger/p0"


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def checkpoints(n: int, leaves_per: int, signer: checkpoint.Signer) -> list[tuple[bytes, int, list[bytes]]]:
    """n signed checkpoints of a growing tree, each with the proof from the one before (as seals carry)."""
    tree, out = merkle.CompactTree(), []
    for i in range(n):
        leaves = [hashlib.sha256(os.urandom(16)).digest() for _ in range(leaves_per)]
        old = tree.size
        proof = merkle.extension_proof(tree, leaves) if old else []
        tree.extend(leaves)
        line = sessionmap.extension_line({"count": i + 1, "root": os.urandom(32).hex()})
        note = checkpoint.sign_checkpoint(checkpoint.Checkpoint(ORIGIN, tree.size, tree.root(), (line,)), [signer])
        out.append((note, old, proof))
    return out


def bench_witness(n: int) -> None:
    log_key = SigningKey.generate()
    signer = checkpoint.Signer.from_key(ORIGIN, log_key)
    cosigner = checkpoint.Cosigner("bench-witness", SigningKey.generate())
    keys = {ORIGIN: [signer.verifier]}
    with tempfile.TemporaryDirectory(dir=".") as d:
        stream = checkpoints(2 * n, 100, signer)
        witness = Witness(Path(d) / "w", cosigner, keys.get)
        start = time.perf_counter()
        for note, old, proof in stream[:n]:
            witness.add(note, old, proof)
        direct = rate(n, time.perf_counter() - start)
        server = serve(witness, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/add-checkpoint"
        start = time.perf_counter()
        for note, old, proof in stream[n:]:
            with urllib.request.urlopen(urllib.request.Request(url, add_checkpoint_body(note, old, proof)),
                                        timeout=10) as response:
                response.read()
        http = rate(n, time.perf_counter() - start)
        server.shutdown()
        server.server_close()
        witness.close()
        # baselines: what one cosignature is made of
        message, verify_key = b"x" * 200, log_key.verify_key
        signature = log_key.sign(message).signature
        start = time.perf_counter()
        for _ in range(n):
            verify_key.verify(message, signature)
            cosigner.signing_key.sign(message)
        crypto = rate(n, time.perf_counter() - start)
        path, data = Path(d) / "state.json", os.urandom(2048)
        start = time.perf_counter()
        for _ in range(n):
            write_atomic(path, data)
        durable = rate(n, time.perf_counter() - start)
    print(f"witness, {n:,} checkpoints of +100 leaves each (proof {len(stream[-1][2])} hashes):")
    print(f"{'cosignatures/s, in-process':>44} {direct:>10,.0f}")
    print(f"{'cosignatures/s, HTTP add-checkpoint':>44} {http:>10,.0f}")
    print(f"{'baseline: Ed25519 verify + sign /s':>44} {crypto:>10,.0f}")
    print(f"{'baseline: durable 2 KB state writes/s':>44} {durable:>10,.0f}")


def make_events(key: PrivateKey, n: int, sessions: int) -> list[Record]:
    chains = [SessionChain(key, f"bench-{i}") for i in range(sessions)]
    events = [chains[i % sessions].event("frames", {"direction": "server", "messages": [
        {"type": "DataRow", "data": os.urandom(64)}]}) for i in range(n)]
    return [Record("bench.events", 0, i, e.session_id.encode(), e.value) for i, e in enumerate(events)]


def seal_rate(records: list[Record], keyring: Keyring, ledger_key: PrivateKey, per_seal: int, with_map: bool) -> float:
    with tempfile.TemporaryDirectory(dir=".") as d:
        settings = LedgerSettings(dir=Path(d), origin="bench.custody/ledger", segment_max_events=per_seal,
                                  segment_max_bytes=1 << 30, segment_max_seconds=3600, idle_seal_seconds=3600)
        writer = PartitionWriter(Path(d), settings, "bench.events", recover(Path(d), 0), keyring, ledger_key)
        start = time.perf_counter()
        for i in range(0, len(records), per_seal):
            batch = records[i:i + per_seal]
            writer.add_batch(batch, os.urandom(SALT_SIZE * len(batch)))
            if not with_map:
                writer.touched.clear()  # the map update skipped: the seal states the unchanged root
            writer.seal()
        return rate(len(records), time.perf_counter() - start)


def bench_sealing(n: int, per_seal: int, sessions: int, rounds: int = 2) -> None:
    proxy_signing, ledger_signing = SigningKey.generate(), SigningKey.generate()
    proxy = PrivateKey(key_id_for("proxy", bytes(proxy_signing.verify_key)), proxy_signing)
    ledger_key = PrivateKey(key_id_for("ledger", bytes(ledger_signing.verify_key)), ledger_signing)
    keyring = Keyring([TrustedKey(proxy.key_id, "proxy", proxy.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    records = make_events(proxy, n, sessions)
    with_map, without = [], []
    for _ in range(rounds):
        with_map.append(seal_rate(records, keyring, ledger_key, per_seal, True))
        without.append(seal_rate(records, keyring, ledger_key, per_seal, False))
    a, b = max(with_map), max(without)
    touched = min(sessions, per_seal)
    print(f"sealing {n:,} events of {sessions:,} sessions, a seal every {per_seal:,} events ({touched:,} sessions "
          f"touched per seal), best of {rounds}:")
    print(f"{'sealed events/s, with the session map':>44} {a:>10,.0f}")
    print(f"{'baseline: sealed events/s, map skipped':>44} {b:>10,.0f}")
    print(f"{'map cost per sealed event':>44} {(1 / a - 1 / b) * 1e6:>10.2f} µs ({(1 - a / b) * 100:.1f}% of sealing)")


def bench_proofs(sessions: int, samples: int = 2000) -> None:
    rng = random.Random(16)
    start = time.perf_counter()
    states = sessionmap.SessionMap()
    for i in range(sessions):
        states.put(f"session-{i}", sessionmap.SessionState(rng.randrange(1, 20), rng.randbytes(32), bool(i & 1)))
    root = states.root()
    built = time.perf_counter() - start
    present = [f"session-{rng.randrange(sessions)}" for _ in range(samples)]
    absent = [f"absent-{i}" for i in range(samples)]
    for name, ids in (("present", present), ("absent", absent)):
        proofs = [states.prove(s) for s in ids]
        size = sum(len(json.dumps(p.to_json())) for p in proofs) / len(proofs)
        hashes = sum(len(p.siblings) for p in proofs) / len(proofs)
        start = time.perf_counter()
        for s, p in zip(ids, proofs):
            result = sessionmap.verify_state(root, s, p)
            assert (result is not None) == (name == "present")
        per = (time.perf_counter() - start) / len(ids)
        print(f"{'state proof, ' + name + ' session':>44} {size:>10,.0f} B JSON, {hashes:.1f} sibling hashes, "
              f"verify {per * 1e6:.1f} µs")
    start = time.perf_counter()
    for _ in range(samples):
        hashlib.sha256(b"x" * 96).digest()
    sha = (time.perf_counter() - start) / samples
    print(f"{'baseline: one SHA-256 of 96 bytes':>44} {sha * 1e6:>10.2f} µs "
          f"(a proof is ~{hashes:.0f} of them: {hashes * sha * 1e6:.1f} µs)")
    print(f"{'map of ' + f'{sessions:,}' + ' sessions built in':>44} {built:>10.1f} s "
          f"({built / sessions * 1e6:.1f} µs per session; root {base64.b64encode(root).decode()[:12]}…)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=2000, help="checkpoints given to the witness (each way)")
    parser.add_argument("--events", type=int, default=100_000, help="events sealed (each run)")
    parser.add_argument("--seal-every", type=int, default=5000, help="events per seal")
    parser.add_argument("--seal-sessions", type=int, default=20_000, help="sessions the sealed events belong to")
    parser.add_argument("--sessions", type=int, default=1_000_000, help="sessions in the map the proofs are of")
    args = parser.parse_args()
    bench_witness(args.checkpoints)
    bench_sealing(args.events, args.seal_every, args.seal_sessions)
    bench_proofs(args.sessions)


if __name__ == "__main__":
    main()

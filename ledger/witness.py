"""The witness: cosigns a log's checkpoints only after checking that the log only ever grew.

A witness (c2sp.org/tlog-witness) keeps, per origin, the latest checkpoint it
cosigned. Given a new checkpoint and an RFC 9162 consistency proof from that
one, it checks the log's signature, then the proof, and only then records the
new checkpoint durably and returns a C2SP `cosignature/v1` (timestamped). What
it refuses — a smaller tree than it cosigned (rollback), another root at a size
it cosigned (fork), a proof that does not lead from its checkpoint to the new
one (inconsistent) — it records and reports as a violation: such a request,
validly signed by the log, is proof of the log's misbehaviour.

Two ways in, one state: `add_checkpoint` takes the C2SP add-checkpoint request
body (served over HTTP by `serve`), `add_seal` takes a ledger seal as published
on `custody.seals` (its checkpoint and the proof from the previous seal).

Key rotation: a checkpoint with a `custody.key-rotation/v1 <key id> <key>` line (a Custody rotation seal's,
signed by the outgoing key) hands its origin to the new key once cosigned; the witness keeps that key in the
origin's state and from then on opens the origin's checkpoints with it alone, so it follows rotations without
being reconfigured and a retired key cannot sign on. Over `custody.seals` it also checks the new key's
signature of the handover, and that the checkpoint's line is that seal's rotation (no line without a signed
handover); over HTTP the outgoing key's signature of the line is the authority (ledger/README.md, Witnesses). At a size it
cosigned, another session-map root (`custody.sessions/v1` line) is a fork like another tree root.

State, one file per origin under `<state dir>/logs/<sha256(origin)>.json`, is
written atomically and fsync'd before a cosignature leaves the witness; the check
and the update are one step under a lock, and a lock file keeps a second witness
process off the same state. A crash loses at most a cosignature that was never
returned; a restart carries on from the last one it returned.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from ingest import kafka
from ingest.errors import CustodyError
from ingest.keys import Keyring, PrivateKey
from ingest.settings import KafkaSettings
from ledger import checkpoint, merkle
from ledger.durable import write_atomic
from ledger.seals import Seal

log = logging.getLogger(__name__)

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""RFC 6962's root of the empty tree: a size-0 checkpoint must state it."""
MAX_PROOF_LINES = 63
MAX_REQUEST_BYTES = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
RECENT_SEALS = 64
_OLD_LINE = re.compile(r"old (0|[1-9][0-9]*)")


class WitnessError(CustodyError):
    """The witness cannot start or run (state, lock, configuration)."""


class Refused(WitnessError):
    """add-checkpoint refused, with the HTTP status the C2SP spec prescribes for the reason."""

    status = 400

    def __init__(self, message: str, body: bytes | None = None, content_type: str = "text/plain; charset=utf-8"):
        super().__init__(message)
        self.body = body if body is not None else (message + "\n").encode()
        self.content_type = content_type


class BadRequest(Refused):
    status = 400


class Forbidden(Refused):
    """No signature by a key trusted for the origin, or one that does not verify."""

    status = 403


class UnknownOrigin(Refused):
    status = 404


class SizeConflict(Refused):
    """The old size is not the size the witness last cosigned; the body says which size that is."""

    status = 409

    def __init__(self, message: str, latest: int):
        super().__init__(message, f"{latest}\n".encode(), SIZE_CONTENT_TYPE)
        self.latest = latest


class Unprocessable(Refused):
    status = 422


class Misbehaviour(Refused):
    """A refusal that is evidence the log misbehaved (published as a violation)."""

    kind = ""


class Rollback(SizeConflict, Misbehaviour):
    kind = "rollback"


class Fork(Unprocessable, Misbehaviour):
    kind = "fork"


class Inconsistent(Unprocessable, Misbehaviour):
    kind = "inconsistent"


def origin_hash(origin: str) -> str:
    return hashlib.sha256(origin.encode()).hexdigest()


@dataclass(frozen=True)
class Witnessed:
    """The latest checkpoint the witness cosigned for one origin."""

    origin: str
    size: int
    root: bytes
    note: bytes
    """The log's signed note as verified, with this witness's cosignature appended."""
    timestamp: int
    seal_number: int | None = None
    """For Custody ledgers fed over `custody.seals`: the seal whose checkpoint this is."""
    seal_hash: str | None = None
    recent: dict[str, str] = field(default_factory=dict)
    """Hashes of the last RECENT_SEALS seals cosigned, by number: a re-delivery is told from a rewrite."""
    log_key: str | None = None
    """The log key (vkey) a cosigned key-rotation checkpoint handed the origin over to: from then on only its
    signature opens a checkpoint of the origin, whatever the configured keys say (the witness follows
    rotations itself, and a retired key cannot sign on)."""

    @property
    def checkpoint(self) -> checkpoint.Checkpoint:
        """The cosigned checkpoint (the note's text, without its signatures)."""
        return checkpoint.Checkpoint.parse(self.note.decode().split("\n\n", 1)[0] + "\n")

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "origin": self.origin, "size": self.size, "root": base64.b64encode(self.root).decode(),
                "note": self.note.decode(), "timestamp": self.timestamp, "seal_number": self.seal_number,
                "seal_hash": self.seal_hash, "recent": self.recent, "log_key": self.log_key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Witnessed:
        return cls(data["origin"], data["size"], base64.b64decode(data["root"]), data["note"].encode(),
                   data["timestamp"], data.get("seal_number"), data.get("seal_hash"), data.get("recent", {}),
                   data.get("log_key"))


def rotated_key(cp: checkpoint.Checkpoint) -> checkpoint.Verifier | None:
    """The log key a checkpoint's `custody.key-rotation/v1 <key id> <base64 key>` line hands its origin to."""
    from ledger.rotation import EXTENSION_PREFIX

    lines = [line.split(" ") for line in cp.extensions if line.split(" ", 1)[0] == EXTENSION_PREFIX]
    if not lines:
        return None
    if len(lines) > 1 or len(lines[0]) != 3:
        raise BadRequest(f"checkpoint of {cp.origin!r}: malformed {EXTENSION_PREFIX} line")
    try:
        public_key = base64.b64decode(lines[0][2], validate=True)
        return checkpoint.Verifier.from_key(cp.origin, VerifyKey(public_key))
    except (ValueError, TypeError, CryptoError):
        raise BadRequest(f"checkpoint of {cp.origin!r}: {EXTENSION_PREFIX} line has no valid Ed25519 key") from None


def session_line(cp: checkpoint.Checkpoint) -> str | None:
    """The session-state map line (`custody.sessions/v1 …`) a checkpoint states, if any."""
    from ledger.sessionmap import EXTENSION_PREFIX

    return next((line for line in cp.extensions if line.split(" ", 1)[0] == EXTENSION_PREFIX), None)


LogKeys = Callable[[str], Sequence[checkpoint.Verifier] | None]
"""The log keys trusted for an origin (under the origin as note key name), or None if the origin is unknown."""


class Witness:
    """One witness key, its per-origin state, and the checks before each cosignature."""

    def __init__(self, state_dir: Path, cosigner: checkpoint.Cosigner, log_keys: LogKeys,
                 on_violation: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.dir, self.cosigner, self.log_keys = Path(state_dir), cosigner, log_keys
        self.on_violation, self.clock = on_violation, clock
        self._lock = threading.Lock()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / "witness.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WitnessError(f"{self.dir}: another witness process holds this state directory") from None
        self.violations: list[dict[str, Any]] = []

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = -1

    @property
    def verifier(self) -> checkpoint.CosignatureVerifier:
        return self.cosigner.verifier

    # --- state ------------------------------------------------------------------------------

    def _path(self, origin: str) -> Path:
        return self.dir / "logs" / f"{origin_hash(origin)}.json"

    def latest(self, origin: str) -> Witnessed | None:
        try:
            data = json.loads(self._path(origin).read_bytes())
        except FileNotFoundError:
            return None
        return Witnessed.from_json(data)

    def _store(self, witnessed: Witnessed) -> None:
        write_atomic(self._path(witnessed.origin), json.dumps(witnessed.to_json(), indent=1).encode())

    # --- the checks -------------------------------------------------------------------------

    def _open(self, note: bytes, latest: Witnessed | None) -> tuple[checkpoint.Checkpoint, bytes]:
        """The checkpoint, verified against the keys trusted for its origin (404 / 403 otherwise): the key a
        cosigned rotation handed the origin to, else the configured keys."""
        try:
            origin = note.decode().split("\n", 1)[0]
        except UnicodeDecodeError:
            raise BadRequest("checkpoint is not UTF-8") from None
        keys = self.log_keys(origin)
        if keys is None:
            raise UnknownOrigin(f"unknown origin {origin!r}")
        if latest is not None and latest.log_key is not None:
            keys = [checkpoint.Verifier.parse(latest.log_key)]
        try:
            cp, _ = checkpoint.open_checkpoint(note, keys, origin=origin)
        except checkpoint.NoTrustedSignatureError as exc:
            if latest is not None and latest.log_key is not None:
                raise Forbidden(f"checkpoint of {origin!r} is not signed by key {keys[0].key_id.hex()}, the key a "
                                f"cosigned key rotation handed the log to") from None
            raise Forbidden(f"checkpoint of {origin!r}: {exc}") from None
        except checkpoint.InvalidSignatureError as exc:
            raise Forbidden(f"checkpoint of {origin!r}: {exc}") from None
        except checkpoint.NoteError as exc:
            raise BadRequest(f"checkpoint of {origin!r}: {exc}") from None
        return cp, note

    def add(self, note: bytes, old_size: int, proof: Sequence[bytes], *, seal: Seal | None = None) -> checkpoint.Cosignature:
        """Check `note` against the latest cosigned checkpoint of its origin, record it, return the cosignature."""
        try:
            origin = note.decode().split("\n", 1)[0]
        except UnicodeDecodeError:
            raise BadRequest("checkpoint is not UTF-8") from None
        with self._lock:  # check and update as one step: no rollback by racing requests (nor past a rotation)
            latest = self.latest(origin)
            cp, note = self._open(note, latest)
            handed_to = rotated_key(cp)
            try:
                self._check(cp, latest, old_size, proof, seal)
            except Misbehaviour as exc:
                self._violation(cp, latest, exc, note)
                raise
            timestamp = max(int(self.clock()), latest.timestamp if latest else 0)
            cosignature = self.cosigner.cosign(cp.to_text(), timestamp)
            same_tree = latest is not None and latest.size == cp.size
            recent = dict(latest.recent) if latest else {}
            if seal is not None:
                recent[str(seal.number)] = seal.hash.hex()
                recent = {n: h for n, h in recent.items() if int(n) > seal.number - RECENT_SEALS}
            witnessed = Witnessed(cp.origin, cp.size, cp.root_hash,
                                  checkpoint.add_signature_lines(note, [cosignature.line]), timestamp,
                                  seal.number if seal else (latest.seal_number if same_tree else None),
                                  seal.hash.hex() if seal else (latest.seal_hash if same_tree else None), recent,
                                  handed_to.vkey if handed_to else (latest.log_key if latest else None))
            self._store(witnessed)  # durable before the cosignature is returned
        return cosignature

    @staticmethod
    def _check(cp: checkpoint.Checkpoint, latest: Witnessed | None, old_size: int, proof: Sequence[bytes],
               seal: Seal | None) -> None:
        cosigned = latest.size if latest else 0
        if latest is not None and cp.size < latest.size:
            raise Rollback(f"rollback: {cp.origin} presents tree size {cp.size}, smaller than size {latest.size} "
                           f"cosigned at {latest.timestamp}", latest.size)
        if old_size > cp.size:
            raise BadRequest(f"old size {old_size} is larger than the checkpoint's size {cp.size}")
        if old_size != cosigned:
            raise SizeConflict(f"old size {old_size} is not the latest cosigned size {cosigned}", cosigned)
        if cp.size == 0 and cp.root_hash != EMPTY_ROOT:
            raise Unprocessable("a checkpoint of size 0 must have the empty tree's root")
        if latest is not None and cp.size == latest.size and cp.root_hash != latest.root:
            raise Fork(f"fork: {cp.origin} presents root {cp.root_hash.hex()[:16]}… at size {cp.size}, "
                       f"where root {latest.root.hex()[:16]}… was cosigned at {latest.timestamp}")
        if latest is not None and cp.size == latest.size:
            stated, cosigned_line = session_line(cp), session_line(latest.checkpoint)
            if stated is not None and cosigned_line is not None and stated != cosigned_line:
                raise Fork(f"fork: {cp.origin} presents session-map root {_map_root(stated)} at tree size {cp.size}, "
                           f"where session-map root {_map_root(cosigned_line)} was cosigned at {latest.timestamp}: "
                           f"two session states for one tree")
        if seal is not None and latest is not None and latest.recent.get(str(seal.number)) not in (None, seal.hash.hex()):
            raise Fork(f"fork: {cp.origin} seal {seal.number} differs from the seal {seal.number} cosigned before "
                       f"(size {latest.size} cosigned at {latest.timestamp})")
        if old_size == 0:
            if proof:
                raise Unprocessable("old size 0 needs an empty consistency proof")
            return
        try:
            merkle.verify_consistency(old_size, cp.size, latest.root, cp.root_hash, list(proof))
        except merkle.MerkleError as exc:
            raise Inconsistent(f"inconsistent: {cp.origin} at size {cp.size} is not an extension of the tree of "
                               f"size {old_size} cosigned at {latest.timestamp} ({exc})") from None

    def _violation(self, cp: checkpoint.Checkpoint, latest: Witnessed | None, exc: Misbehaviour, note: bytes) -> None:
        """Record (and hand to `on_violation`) a validly signed checkpoint that the log should never have made."""
        now = int(self.clock())
        document = {
            "schema": "custody.violation/v1",
            "id": hashlib.sha256(b"witness\n" + note + exc.kind.encode()).hexdigest()[:32],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "severity": "critical", "category": "log_misbehavior", "reason": exc.kind, "detail": str(exc),
            "identity": None, "source_address": None, "target": None, "statement": None, "rule": None,
            "action": None, "session_id": None, "event_id": None,
            "source": f"witness {self.cosigner.name}: {cp.origin}",
            "evidence": {"checkpoint": note.decode(), "cosigned": latest.note.decode() if latest else None},
        }
        with open(self.dir / "violations.jsonl", "ab") as out:  # the witness's own record, kept before reporting
            out.write(json.dumps(document, sort_keys=True).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        self.violations.append(document)
        log.warning("witness %s: %s", self.cosigner.name, exc)
        if self.on_violation is not None:
            self.on_violation(document)

    # --- ways in ----------------------------------------------------------------------------

    def add_checkpoint(self, body: bytes) -> bytes:
        """A C2SP add-checkpoint request body in, the response body (cosignature lines) out; raises Refused."""
        old_size, proof, note = parse_add_checkpoint(body)
        return (self.add(note, old_size, proof).line + "\n").encode()

    def add_seal(self, seal: Seal) -> checkpoint.Cosignature | None:
        """Cosign a Custody seal's checkpoint (as read from `custody.seals`), or None if it was cosigned already.

        The seal carries the proof from the previous seal's tree. A seal the witness has seen (same number, same
        hash: the ledger re-publishes its last seal on restart, Kafka re-delivers) is skipped; a seal numbered
        like a witnessed one but with other contents is a rewritten history and goes through the checks, which
        refuse it. A witness that starts late takes the first seal it sees on trust (old size 0), as C2SP allows.
        """
        latest = self.latest(seal.record["origin"])
        if latest is not None:
            seen = latest.recent.get(str(seal.number))
            if seen == seal.hash.hex() or (seen is None and latest.seal_number is not None
                                           and seal.number < latest.seal_number - RECENT_SEALS):
                return None
        from ledger.rotation import EXTENSION_PREFIX, RotationError, check_rotation, extension_line
        try:  # the new key must have consented (ledger/rotation.py), or no handover
            handed = [extension_line(seal.record["rotation"])] if seal.record.get("rotation") else []
            if handed:
                check_rotation(seal.record)
        except (RotationError, KeyError, TypeError) as exc:
            raise BadRequest(f"seal {seal.number} of {seal.record['origin']}: {exc}") from None
        try:
            text = checkpoint.Checkpoint.parse(seal.checkpoint_note.decode().split("\n\n", 1)[0] + "\n")
        except (UnicodeDecodeError, checkpoint.NoteError) as exc:
            raise BadRequest(f"seal {seal.number} of {seal.record['origin']}: checkpoint: {exc}") from None
        if [line for line in text.extensions if line.split(" ", 1)[0] == EXTENSION_PREFIX] != handed:
            # what hands the origin over is the checkpoint's line (add), so it must be the handover just checked
            raise BadRequest(f"seal {seal.number} of {seal.record['origin']}: its checkpoint's {EXTENSION_PREFIX} "
                             f"line is not the rotation its record carries with the new key's signed handover")
        previous_size = seal.tree_size - seal.record["leaves"]["count"]
        if latest is None:
            old, proof = 0, ()
        elif latest.size == seal.tree_size:
            old, proof = latest.size, ()
        else:  # from the previous seal's tree; anything else cannot be proven from what the seal carries
            old, proof = latest.size, (seal.consistency_proof if latest.size == previous_size else ())
        return self.add(seal.checkpoint_note, old, proof, seal=seal)


def _map_root(line: str) -> str:
    """A session-map line's root, short, for a refusal message."""
    try:
        return base64.b64decode(line.split(" ")[2]).hex()[:16] + "…"
    except (IndexError, ValueError):
        return repr(line)


def parse_add_checkpoint(body: bytes) -> tuple[int, list[bytes], bytes]:
    """(old size, consistency proof, checkpoint note) of an add-checkpoint request body; BadRequest if malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request body is {len(body)} bytes, more than {MAX_REQUEST_BYTES}")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise BadRequest("request body has no empty line before the checkpoint")
    lines = head.split("\n")
    match = _OLD_LINE.fullmatch(lines[0])
    if not match:
        raise BadRequest(f"first line {lines[0]!r} is not 'old <size>'")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise BadRequest(f"{len(lines) - 1} consistency proof lines, more than {MAX_PROOF_LINES}")
    proof = []
    for number, line in enumerate(lines[1:], 2):
        try:
            value = base64.b64decode(line, validate=True)
        except ValueError:
            raise BadRequest(f"line {number} is not base64") from None
        if len(value) != merkle.HASH_SIZE:
            raise BadRequest(f"line {number} is {len(value)} bytes, not a {merkle.HASH_SIZE}-byte hash")
        proof.append(value)
    return int(match.group(1)), proof, note.encode()


def add_checkpoint_body(note: bytes, old_size: int, proof: Sequence[bytes]) -> bytes:
    """The request body a log sends to a witness's add-checkpoint."""
    lines = [f"old {old_size}"] + [base64.b64encode(h).decode() for h in proof]
    return ("\n".join(lines) + "\n\n").encode() + note


# --- HTTP ------------------------------------------------------------------------------------


def serve(witness: Witness, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call serve_forever) with C2SP add-checkpoint and the monitoring GET."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the spec recommends

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.info("witness http: " + format, *args)

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") != "/add-checkpoint":
                self._reply(404, b"not found\n")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, b"Content-Length required\n")
                return
            if length > MAX_REQUEST_BYTES:
                self._reply(413, b"request too large\n")
                self.close_connection = True
                return
            body = self.rfile.read(length)
            try:
                response = witness.add_checkpoint(body)
            except Refused as exc:
                self._reply(exc.status, exc.body, exc.content_type)
                return
            self._reply(200, response)

        def do_GET(self) -> None:  # noqa: N802
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[1] == "checkpoint" and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                for path in (witness.dir / "logs").glob(f"{parts[0]}.json"):
                    witnessed = Witnessed.from_json(json.loads(path.read_bytes()))
                    self._reply(200, witnessed.note)
                    return
            self._reply(404, b"not found\n")

    return ThreadingHTTPServer((host, port), Handler)


# --- a witness for Custody ledgers: keys from the keyring, fed over custody.seals ------------------


def custody_log_keys(keyring: Keyring, ledger_origins: Sequence[str]) -> LogKeys:
    """Origins `<ledger origin>/p<N>` of the configured ledgers, each trusting every ledger key of the keyring
    under the origin as note key name (as the ledger signs its checkpoints)."""
    pattern = re.compile("(?:" + "|".join(re.escape(o) for o in ledger_origins) + r")/p(0|[1-9][0-9]*)")

    def keys(origin: str) -> list[checkpoint.Verifier] | None:
        if not pattern.fullmatch(origin):
            return None
        return [checkpoint.Verifier.from_key(origin, k.verify_key) for k in keyring if k.role == "ledger"]

    return keys


def cosigner_for(key: PrivateKey) -> checkpoint.Cosigner:
    """A witness key's cosigner: its name is the key's name (the key id before `+`), as verifiers derive it."""
    return checkpoint.Cosigner(key.key_id.split("+")[0], key.signing_key)


def cosignature_verifiers(keyring: Keyring) -> list[checkpoint.CosignatureVerifier]:
    """Every `witness` key of the keyring as a cosignature verifier, named as `cosigner_for` names it."""
    return [checkpoint.CosignatureVerifier(k.key_id.split("+")[0], k.verify_key) for k in keyring if k.role == "witness"]


class SealFeed:
    """Reads `custody.seals` as its own consumer group, cosigns each new seal, publishes the cosignatures to
    `custody.cosignatures` and refusals to `custody.violations`; offsets are committed after the state is durable."""

    def __init__(self, witness: Witness, settings: KafkaSettings, group_id: str = "custody-witness"):
        from ledger.cosignatures import COSIGNATURES_TOPIC

        self.witness, self.settings = witness, settings
        kafka.ensure_topics(settings, ("seals", COSIGNATURES_TOPIC, "violations"))
        self.cosignatures_topic, self.violations_topic = settings.topic(COSIGNATURES_TOPIC), settings.topic("violations")
        self.producer = kafka.producer(settings)
        self.consumer = kafka.consumer(settings, settings.topic("seals"), group_id=group_id)
        witness.on_violation = self._publish_violation
        self.cosigned = 0
        self.refused = 0

    def _publish_violation(self, document: dict[str, Any]) -> None:
        self.producer.send(self.violations_topic, key=document["source"].encode(), value=json.dumps(document).encode())

    def step(self, timeout: float = 0.2) -> int:
        from ledger.cosignatures import message

        batches = self.consumer.poll(timeout_ms=int(timeout * 1000))
        done = 0
        for messages in batches.values():
            for m in messages:
                try:
                    seal = Seal.from_bytes(m.value)
                except CustodyError as exc:
                    log.warning("custody.seals offset %d: %s", m.offset, exc)
                    continue
                try:
                    cosignature = self.witness.add_seal(seal)
                except Refused as exc:
                    self.refused += 1
                    log.warning("witness: seal %s of %s refused: %s", seal.number, seal.record["origin"], exc)
                    continue
                if cosignature is not None:
                    self.producer.send(self.cosignatures_topic, key=f"p{seal.partition}".encode(),
                                       value=message(seal.record["origin"], seal.partition, seal.number,
                                                     seal.tree_size, cosignature.line))
                    self.cosigned += 1
                    done += 1
        if batches:
            self.producer.flush(timeout=10)
            self.consumer.commit()
        return done

    def close(self) -> None:
        self.producer.flush(timeout=10)
        self.producer.close(timeout=5)
        self.consumer.close(autocommit=False)

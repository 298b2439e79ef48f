"""The ledger pushing its checkpoints to remote witnesses over HTTP (C2SP tlog-witness `add-checkpoint`).

`custody.seals` reaches witnesses that can read the ledger's Kafka; a witness on another host, run by another
party (an auditor, a public witness network), speaks only C2SP tlog-witness. For each `[[ledger.witness]] url`
the ledger POSTs every seal's checkpoint to `<url>/add-checkpoint` with the consistency proof from the tree
that witness last cosigned, and keeps the cosignatures it returns beside the seal
(`cosignatures/p<N>/<NNNNNN>.<key id>.sig`, as for the Kafka path: ledger/cosignatures.py). Unverified:
`custody verify` and bundles check them against the witness keys the auditor trusts.

The ledger keeps only the compact frontier of its tree, so it can prove consistency only from one seal's
tree to the next (each seal carries that proof). A witness is therefore given every seal in order, from the one
after the last it cosigned: a witness that was unreachable, or answers 409 with an older size, is caught up
from the seal files on disk (which also makes it cosign every rotation seal, which it must see to follow
the chain's key). Pushing runs on its own thread: a slow or absent witness never stalls sealing; what could
not be pushed is retried at the next seal (or `RETRY_SECONDS` later).
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ledger import checkpoint, cosignatures
from ledger.seals import SEALS_DIR, Seal, partition_name
from ledger.witness import SIZE_CONTENT_TYPE, add_checkpoint_body

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
RETRY_SECONDS = 5.0
MAX_ROUNDS = 4
"""409 answers followed within one push before giving up until the next seal (each names a size to start from)."""
MAX_FAILURES = 100


class PushError(Exception):
    """One witness could not be given one seal; the message is the log line."""


class PushRefused(PushError):
    """The witness answered, and refused: not retried until a newer seal (the witness recorded why)."""


@dataclass
class _Cursor:
    """What the ledger knows of one witness for one partition: the last seal it cosigned and that seal's size."""

    number: int | None = None
    size: int | None = None


def previous_size(seal: Seal) -> int:
    return seal.tree_size - seal.record["leaves"]["count"]


def _proof(seal: Seal, old: int) -> list[bytes] | None:
    """The consistency proof from tree size `old` to the seal's tree, if the seal can give it (from 0: none, a
    witness's first checkpoint of a log is taken on trust)."""
    if old == seal.tree_size or old == 0:
        return []
    if old == previous_size(seal):
        return list(seal.consistency_proof)
    return None


class WitnessPusher:
    """Pushes seals to remote witnesses from a thread of its own; `submit` never blocks the ledger."""

    def __init__(self, ledger_dir: Path, urls: tuple[str, ...], timeout: float = TIMEOUT_SECONDS):
        self.dir, self.urls, self.timeout = Path(ledger_dir), tuple(u.rstrip("/") for u in urls), timeout
        self.cursors: dict[tuple[str, int], _Cursor] = {}
        self.newest: dict[int, Seal] = {}
        self.stored = 0
        self.failures: list[str] = []
        """The latest MAX_FAILURES push failures, for tests and for a status line."""
        self.refused: dict[tuple[str, int], int] = {}  # (url, partition) -> the seal it refused
        self._wake: queue.Queue[bool] = queue.Queue()
        self._done = threading.Condition()
        self._submitted = self._tried = 0  # submissions, and how many of them a finished pass covered
        self._thread = threading.Thread(target=self._run, name="witness-push", daemon=True)
        self._thread.start()

    def submit(self, seal: Seal) -> None:
        """Give every witness this seal (and any seal it missed before it), soon."""
        with self._done:
            self.newest[seal.partition] = seal
            self._submitted += 1
        self._wake.put(True)

    def wait(self, timeout: float) -> bool:
        """Until every submitted seal was tried at every witness (tests, shutdown); False on timeout."""
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._tried >= target, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop, after the seals submitted so far were tried (for at most `timeout`: stopping the ledger must not
        wait on an absent witness; it is caught up from the seal files when the ledger runs again)."""
        self.wait(timeout)
        self._wake.put(False)
        self._thread.join(timeout)

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                go = self._wake.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                go = True
            if not go:
                return
            while not self._wake.empty():  # many seals since: one pass covers them all
                if not self._wake.get_nowait():
                    return
            with self._done:
                covered, newest = self._submitted, list(self.newest.values())
            for seal in newest:  # what failed is tried again at the next seal, or after a pause
                for url in self.urls:
                    if self.refused.get((url, seal.partition)) == seal.number:
                        continue
                    try:
                        self.push(url, seal)
                    except PushError as exc:
                        if isinstance(exc, PushRefused):
                            self.refused[(url, seal.partition)] = seal.number
                        self.failures = [*self.failures[-MAX_FAILURES + 1:], str(exc)]
                        log.warning("%s", exc)
            with self._done:
                self._tried = covered
                self._done.notify_all()

    def push(self, url: str, target: Seal) -> None:
        """Bring witness `url` up to seal `target`, one seal at a time from the last it cosigned."""
        cursor = self.cursors.setdefault((url, target.partition), _Cursor())
        for _ in range(MAX_ROUNDS):
            if cursor.number is not None and cursor.number >= target.number:
                return
            chain = self._seals_after(target, cursor.number) if cursor.number is not None else [target]
            for seal in chain:
                old = cursor.size if cursor.size is not None else previous_size(seal)
                latest = self._add(url, seal, old)
                if latest is not None:  # 409: the witness says which size it cosigned last
                    self._resync(url, cursor, seal, latest)
                    break
                cursor.number, cursor.size = seal.number, seal.tree_size
            else:
                return
        raise PushRefused(f"witness {url}: p{target.partition} seal {target.number} not cosigned after {MAX_ROUNDS} "
                        f"size conflicts")

    def _add(self, url: str, seal: Seal, old: int) -> int | None:
        """POST one seal's checkpoint; store what it returns. The witness's size on a 409, else None."""
        proof = _proof(seal, old)
        if proof is None:
            raise PushRefused(f"witness {url}: p{seal.partition} seal {seal.number} cannot prove consistency from "
                            f"tree size {old}, which the witness cosigned last (no seal of this ledger has it)")
        request = urllib.request.Request(f"{url}/add-checkpoint", method="POST",
                                         data=add_checkpoint_body(seal.checkpoint_note, old, proof))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code == 409 and (exc.headers.get("Content-Type") or "").startswith(SIZE_CONTENT_TYPE):
                try:
                    return int(body.decode().strip())
                except ValueError:
                    pass
            reason = body.decode(errors="replace").strip().splitlines()[0] if body.strip() else exc.reason
            if exc.code >= 500:  # the witness is unwell, not refusing: tried again later
                raise PushError(f"witness {url}: p{seal.partition} seal {seal.number} failed ({exc.code}): "
                                f"{reason}") from None
            raise PushRefused(f"witness {url}: p{seal.partition} seal {seal.number} refused ({exc.code}): "
                            f"{reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PushError(f"witness {url}: p{seal.partition} seal {seal.number} not delivered: {reason}") from None
        for line in body.decode(errors="replace").splitlines():
            try:
                self.stored += cosignatures.store(self.dir, seal.partition, seal.number, line)
            except checkpoint.NoteError as exc:
                raise PushError(f"witness {url}: p{seal.partition} seal {seal.number}: not a cosignature in the "
                                f"response ({exc})") from None
        return None

    def _resync(self, url: str, cursor: _Cursor, seal: Seal, latest: int) -> None:
        """After a 409: start again from the last seal of the witness's size (before `seal`)."""
        if latest > seal.tree_size:
            raise PushRefused(f"witness {url}: p{seal.partition} has cosigned tree size {latest}, larger than seal "
                            f"{seal.number}'s {seal.tree_size}: this ledger is behind a tree it showed (rolled back?)")
        if _proof(seal, latest) is not None:
            cursor.number, cursor.size = seal.number - 1, latest
            return
        earlier = [s for s in self._load(seal.partition) if s.number < seal.number and s.tree_size == latest]
        if not earlier:
            raise PushRefused(f"witness {url}: p{seal.partition} has cosigned tree size {latest}, which no seal of "
                            f"this ledger has (another log under this origin?)")
        cursor.number, cursor.size = earlier[-1].number, latest

    def _load(self, partition: int) -> list[Seal]:
        return [Seal.load(p) for p in sorted((self.dir / SEALS_DIR / partition_name(partition)).glob("*.json"))]

    def _seals_after(self, target: Seal, number: int) -> list[Seal]:
        if number == target.number - 1:
            return [target]
        return [s for s in self._load(target.partition) if number < s.number < target.number] + [target]

"""Files rebuilt from a session's recorded SFTP packets, sans-I/O: the evidence holds what was transferred.

The proxy records every SFTP packet whole (its `data` is the wire bytes, file
data included) and, on the reply to a CLOSE, the SHA-256 and size it hashed
(`sftp.Transfers`). `extract_files` walks the same packets again, in the order
they were read, and keeps the bytes instead of hashing them: an upload is the
client's WRITEs at their offsets to the handle opened on the path, a download
the target's DATA answers to the client's READs of that handle, at the read
offsets. `Extracted.problem` then compares the rebuilt file with what the proxy
recorded, so a replay can say whether the ledger's bytes are the transferred
file. Legacy `scp -O` is not decoded (its bytes are a channel's raw data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ingest.errors import CustodyError

from . import sftp


@dataclass(frozen=True)
class Extracted:
    """One file as it went through an SFTP handle, with what the proxy recorded at its close (None: never closed)."""

    path: str
    mode: str  # upload | download
    data: bytes | bytearray  # the rebuilt buffer itself: a 100 MiB file is not copied again
    recorded_size: int | None
    recorded_sha256: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def problem(self) -> str | None:
        """What differs from the recorded transfer, in a phrase; None when size and SHA-256 both match."""
        if self.recorded_sha256 is None or self.recorded_size is None:
            return "no SHA-256 recorded (the handle was never closed)"
        differs = []
        if len(self.data) != self.recorded_size:
            differs.append(f"size {len(self.data)} != recorded {self.recorded_size}")
        if self.sha256 != self.recorded_sha256:
            differs.append(f"SHA-256 {self.sha256} != recorded {self.recorded_sha256}")
        return "; ".join(differs) or None


@dataclass
class _File:
    path: str
    mode: str
    data: bytearray = field(default_factory=bytearray)

    def put(self, offset: int, chunk: bytes) -> None:
        """The bytes at their offset, as a file system stores them (a gap reads as zeros)."""
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(chunk)] = chunk

    def done(self, attributes: Mapping[str, str] | None) -> Extracted:
        size = attributes.get("size") if attributes else None
        return Extracted(self.path, self.mode, self.data, int(size) if size is not None else None,
                         attributes.get("sha256") if attributes else None)


@dataclass
class _Channel:
    """One SFTP channel's state, as `sftp.Transfers` keeps it: request ids to opens, reads and closes."""

    opens: dict[int, tuple[str, str]] = field(default_factory=dict)
    files: dict[bytes, _File] = field(default_factory=dict)
    reads: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    closing: dict[int, bytes] = field(default_factory=dict)

    def request(self, packet: sftp.Packet) -> None:
        f = packet.fields
        if packet.type == sftp.OPEN:
            self.opens[packet.id] = (f["path"], sftp.open_mode(f["pflags"]))
        elif packet.type == sftp.WRITE and f["handle"] in self.files:
            self.files[f["handle"]].put(f["offset"], sftp.packet_data(packet))
        elif packet.type == sftp.READ:
            self.reads[packet.id] = (f["handle"], f["offset"])
        elif packet.type == sftp.CLOSE:
            self.closing[packet.id] = f["handle"]

    def response(self, packet: sftp.Packet, attributes: Mapping[str, str]) -> Extracted | None:
        if packet.type == sftp.HANDLE and packet.id in self.opens:
            self.files[packet.fields["handle"]] = _File(*self.opens.pop(packet.id))
        elif packet.type == sftp.DATA and packet.id in self.reads:
            handle, offset = self.reads.pop(packet.id)
            if handle in self.files:
                self.files[handle].put(offset, sftp.packet_data(packet))
        elif packet.type == sftp.STATUS:
            self.opens.pop(packet.id, None)
            self.reads.pop(packet.id, None)
            handle = self.closing.pop(packet.id, None)
            file = self.files.pop(handle, None) if handle is not None else None
            if file is not None:
                return file.done(attributes)
        return None


def extract_files(messages: Iterable[Mapping[str, Any]]) -> list[Extracted]:
    """Every file that went through an SFTP handle, in the order the handles were closed (unclosed ones last).

    `messages` are a session's recorded Message records in the order they were
    read, each with its `direction` (client: requests, server: replies) and
    `channel`; messages that are not SFTP packets are passed over.
    """
    channels: dict[Any, _Channel] = {}
    out: list[Extracted] = []
    for m in messages:
        if not m["type"].startswith("sftp:"):
            continue
        packet = sftp.decode(m["data"])
        if packet.id is None:  # init, version
            continue
        channel = channels.setdefault(m.get("channel"), _Channel())
        if m["direction"] == "client":
            channel.request(packet)
        else:
            done = channel.response(packet, m.get("attributes") or {})
            if done is not None:
                out.append(done)
    out += [file.done(None) for channel in channels.values() for file in channel.files.values()]
    return out


class NoSuchTransfer(CustodyError):
    pass


def select(files: list[Extracted], path: str, nth: int | None = None) -> Extracted:
    """The last transfer of `path` (or its `nth`, from 1); the error lists the paths that were transferred."""
    found = [f for f in files if f.path == path]
    if not found:
        paths = ", ".join(dict.fromkeys(f.path for f in files)) or "none"
        raise NoSuchTransfer(f"no SFTP transfer of {path!r} in this session (transferred: {paths})")
    if nth is None:
        return found[-1]
    if not 1 <= nth <= len(found):
        raise NoSuchTransfer(f"--nth {nth}: {path!r} was transferred {len(found)} time(s) in this session")
    return found[nth - 1]

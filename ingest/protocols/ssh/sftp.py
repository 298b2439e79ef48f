"""SFTP version 3 (draft-ietf-secsh-filexfer-02, what OpenSSH speaks), sans-I/O.

A channel's bytes go into a `PacketReader`, which returns whole packets
(`uint32 length, byte type, …`); `decode` names a packet's fields. The proxy
records each packet as one message, decides requests that change or move
files as operations, and answers a refused one with `status(id,
PERMISSION_DENIED, …)` itself. `Transfers` follows open handles to their
paths and hashes the bytes written to and read from each file (in offset
order), so that a close says which file went which way, how big it was and
its SHA-256 — the bytes themselves are in the recorded packets.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

from ingest.protocols import ProtocolViolation

INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201

NAMES = {
    INIT: "init", VERSION: "version", OPEN: "open", CLOSE: "close", READ: "read", WRITE: "write",
    LSTAT: "lstat", FSTAT: "fstat", SETSTAT: "setstat", FSETSTAT: "fsetstat", OPENDIR: "opendir",
    READDIR: "readdir", REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir", REALPATH: "realpath", STAT: "stat",
    RENAME: "rename", READLINK: "readlink", SYMLINK: "symlink", STATUS: "status", HANDLE: "handle",
    DATA: "data", NAME: "name", ATTRS: "attrs", EXTENDED: "extended", EXTENDED_REPLY: "extended_reply",
}

OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {0: "ok", 1: "eof", 2: "no_such_file", 3: "permission_denied", 4: "failure", 5: "bad_message",
                6: "no_connection", 7: "connection_lost", 8: "op_unsupported"}

READ_FLAG, WRITE_FLAG, APPEND, CREAT, TRUNC, EXCL = 1, 2, 4, 8, 16, 32

# Requests that change or move files: operations that policy decides (besides open).
CHANGES = {REMOVE: "remove", RENAME: "rename", MKDIR: "mkdir", RMDIR: "rmdir", SETSTAT: "setstat",
           FSETSTAT: "fsetstat", SYMLINK: "symlink"}
_PATH_EXTENSIONS = {"posix-rename@openssh.com": 2, "hardlink@openssh.com": 2, "statvfs@openssh.com": 1,
                    "lsetstat@openssh.com": 1, "expand-path@openssh.com": 1, "home-directory": 1}


@dataclass
class Packet:
    """One SFTP packet: its type, request id (None for init/version), decoded fields, wire bytes."""

    type: int
    id: int | None
    fields: dict[str, Any]
    raw: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type_{self.type}")


class PacketReader:
    """Splits a channel's byte stream into whole SFTP packets; a lying or oversized length is a violation."""

    def __init__(self, max_packet: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self.max_packet = max_packet

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out: list[bytes] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 4:
            (length,) = struct.unpack_from(">I", buffer, start)
            if length < 1 or length > self.max_packet:
                raise ProtocolViolation("sftp_bad_length", f"SFTP packet length {length} (limit {self.max_packet})")
            if len(buffer) - start < 4 + length:
                break
            out.append(bytes(buffer[start:start + 4 + length]))
            start += 4 + length
        del buffer[:start]
        return out


class _Cursor:
    __slots__ = ("data", "at")

    def __init__(self, data: bytes, at: int) -> None:
        self.data, self.at = data, at

    def u32(self) -> int:
        if self.at + 4 > len(self.data):
            raise ProtocolViolation("sftp_truncated", "SFTP packet ends inside a field")
        (value,) = struct.unpack_from(">I", self.data, self.at)
        self.at += 4
        return value

    def u64(self) -> int:
        if self.at + 8 > len(self.data):
            raise ProtocolViolation("sftp_truncated", "SFTP packet ends inside a field")
        (value,) = struct.unpack_from(">Q", self.data, self.at)
        self.at += 8
        return value

    def string(self) -> bytes:
        length = self.u32()
        if self.at + length > len(self.data):
            raise ProtocolViolation("sftp_truncated", "SFTP string runs past the packet")
        value = self.data[self.at:self.at + length]
        self.at += length
        return value

    def text(self) -> str:
        return self.string().decode("utf-8", "surrogateescape")

    def attrs(self) -> dict[str, int]:
        flags = self.u32()
        out: dict[str, int] = {}
        if flags & 1:
            out["size"] = self.u64()
        if flags & 2:
            out["uid"], out["gid"] = self.u32(), self.u32()
        if flags & 4:
            out["permissions"] = self.u32()
        if flags & 8:
            out["atime"], out["mtime"] = self.u32(), self.u32()
        if flags & 0x80000000:
            for _ in range(self.u32()):
                self.string(), self.string()
        return out


def decode(raw: bytes) -> Packet:
    """A whole packet (with its length prefix) into its fields; file data stays in `raw`."""
    if len(raw) < 5:
        raise ProtocolViolation("sftp_truncated", "SFTP packet without a type")
    kind = raw[4]
    c = _Cursor(raw, 5)
    f: dict[str, Any] = {}
    if kind in (INIT, VERSION):
        f["version"] = c.u32()
        return Packet(kind, None, f, raw)
    request_id = c.u32()
    if kind == OPEN:
        f["path"], f["pflags"], f["attrs"] = c.text(), c.u32(), c.attrs()
    elif kind in (CLOSE, READDIR, FSTAT):
        f["handle"] = c.string()
    elif kind == READ:
        f["handle"], f["offset"], f["length"] = c.string(), c.u64(), c.u32()
    elif kind == WRITE:
        f["handle"], f["offset"] = c.string(), c.u64()
        length = c.u32()
        f["data_at"], f["length"] = c.at, length
    elif kind == FSETSTAT:
        f["handle"], f["attrs"] = c.string(), c.attrs()
    elif kind in (SETSTAT, MKDIR):
        f["path"], f["attrs"] = c.text(), c.attrs()
    elif kind in (LSTAT, STAT, OPENDIR, REMOVE, RMDIR, REALPATH, READLINK):
        f["path"] = c.text()
    elif kind == RENAME:
        f["path"], f["new_path"] = c.text(), c.text()
    elif kind == SYMLINK:
        f["path"], f["target"] = c.text(), c.text()  # OpenSSH sends (target, link) reversed; both are recorded
    elif kind == STATUS:
        f["code"] = c.u32()
        f["message"] = c.text() if c.at < len(raw) else ""
    elif kind == HANDLE:
        f["handle"] = c.string()
    elif kind == DATA:
        length = c.u32()
        f["data_at"], f["length"] = c.at, length
    elif kind == NAME:
        count = c.u32()
        names = []
        for _ in range(count):
            names.append(c.text())
            c.string()
            c.attrs()
        f["names"] = names
    elif kind == ATTRS:
        f["attrs"] = c.attrs()
    elif kind == EXTENDED:
        f["extension"] = c.text()
        paths = _PATH_EXTENSIONS.get(f["extension"], 0)
        if paths >= 1:
            f["path"] = c.text()
        if paths >= 2:
            f["new_path"] = c.text()
    return Packet(kind, request_id, f, raw)


def packet_data(packet: Packet) -> bytes:
    """The file bytes a WRITE or DATA packet carries."""
    at = packet.fields["data_at"]
    return packet.raw[at:at + packet.fields["length"]]


def status(request_id: int, code: int, message: str) -> bytes:
    """An SSH_FXP_STATUS reply, e.g. the proxy's PERMISSION_DENIED for a refused request."""
    text = message.encode()
    body = struct.pack(">BII", STATUS, request_id, code) + struct.pack(">I", len(text)) + text + b"\0\0\0\0"
    return struct.pack(">I", len(body)) + body


def open_mode(pflags: int) -> str:
    """upload when the open can write, download when it only reads."""
    return "upload" if pflags & (WRITE_FLAG | APPEND | CREAT | TRUNC) else "download"


def flag_names(pflags: int) -> str:
    names = [n for bit, n in ((READ_FLAG, "read"), (WRITE_FLAG, "write"), (APPEND, "append"), (CREAT, "create"),
                              (TRUNC, "truncate"), (EXCL, "excl")) if pflags & bit]
    return ",".join(names) or "none"


@dataclass
class _File:
    path: str
    mode: str  # upload | download
    hash: Any = field(default_factory=hashlib.sha256)
    size: int = 0  # bytes hashed, contiguous from offset 0
    pending: dict[int, bytes] = field(default_factory=dict)  # bytes that arrived ahead of `size`
    moved: int = 0  # every byte read or written, whatever the offset

    def add(self, offset: int, data: bytes) -> None:
        self.moved += len(data)
        if offset == self.size:
            self.hash.update(data)
            self.size += len(data)
            while self.size in self.pending:
                chunk = self.pending.pop(self.size)
                self.hash.update(chunk)
                self.size += len(chunk)
        elif offset > self.size and len(self.pending) < 4096:
            self.pending[offset] = data


@dataclass(frozen=True)
class Transferred:
    """A closed file: its path, which way it went, its size and SHA-256 (of the bytes from offset 0 on)."""

    path: str
    mode: str
    size: int
    sha256: str
    complete: bool  # every byte moved is in the hash (no gaps, no re-reads)


class Transfers:
    """One SFTP channel's open files: request ids to paths, handles to files, file bytes to hashes."""

    def __init__(self) -> None:
        self._opens: dict[int, tuple[str, str]] = {}  # request id -> (path, mode), until HANDLE
        self._files: dict[bytes, _File] = {}
        self._reads: dict[int, tuple[bytes, int]] = {}  # READ request id -> (handle, offset)

    def path_of(self, handle: bytes) -> str | None:
        file = self._files.get(handle)
        return file.path if file is not None else None

    def request(self, packet: Packet) -> None:
        """A client packet relayed to the target."""
        f = packet.fields
        if packet.type == OPEN:
            self._opens[packet.id] = (f["path"], open_mode(f["pflags"]))
        elif packet.type == WRITE:
            file = self._files.get(f["handle"])
            if file is not None:
                file.add(f["offset"], packet_data(packet))
        elif packet.type == READ:
            self._reads[packet.id] = (f["handle"], f["offset"])

    def response(self, packet: Packet) -> Transferred | None:
        """A target packet; a close's status returns what was transferred (`closing` first names the handle)."""
        if packet.type == HANDLE:
            opened = self._opens.pop(packet.id, None)
            if opened is not None:
                self._files[packet.fields["handle"]] = _File(*opened)
        elif packet.type == DATA:
            read = self._reads.pop(packet.id, None)
            if read is not None:
                file = self._files.get(read[0])
                if file is not None:
                    file.add(read[1], packet_data(packet))
        elif packet.type == STATUS:
            self._opens.pop(packet.id, None)
            self._reads.pop(packet.id, None)
        return None

    def close(self, handle: bytes) -> Transferred | None:
        """The client closed a handle: what went through it (None for directories and unknown handles)."""
        file = self._files.pop(handle, None)
        if file is None:
            return None
        return Transferred(file.path, file.mode, file.size, file.hash.hexdigest(),
                           not file.pending and file.moved == file.size)

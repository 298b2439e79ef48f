"""`extract_files`: files rebuilt from recorded SFTP packets (uploads from WRITEs, downloads from DATA answers to
READs, at their offsets), checked against what the proxy recorded at the close; `select` picks one by path."""

from __future__ import annotations

import hashlib
import struct

import pytest

from ingest.protocols.ssh import sftp
from ingest.protocols.ssh.extract import NoSuchTransfer, extract_files, select


def packet(kind: int, request_id: int, *fields: bytes) -> bytes:
    body = struct.pack(">BI", kind, request_id) + b"".join(fields)
    return struct.pack(">I", len(body)) + body


def string(value: bytes | str) -> bytes:
    value = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(value)) + value


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def client(raw: bytes, channel: str = "0") -> dict:
    return {"type": f"sftp:{sftp.decode(raw).name}", "data": raw, "attributes": {}, "channel": channel,
            "direction": "client"}


def server(raw: bytes, channel: str = "0", **attributes: str) -> dict:
    return {"type": f"sftp:{sftp.decode(raw).name}", "data": raw, "attributes": attributes, "channel": channel,
            "direction": "server"}


def recorded(data: bytes) -> dict[str, str]:
    return {"size": str(len(data)), "sha256": hashlib.sha256(data).hexdigest()}


def opened(request_id: int, path: str, pflags: int, handle: bytes, channel: str = "0") -> list[dict]:
    return [client(packet(sftp.OPEN, request_id, string(path), u32(pflags), u32(0)), channel),
            server(packet(sftp.HANDLE, request_id, string(handle)), channel)]


def write(request_id: int, handle: bytes, offset: int, data: bytes, channel: str = "0") -> dict:
    return client(packet(sftp.WRITE, request_id, string(handle), u64(offset), string(data)), channel)


def read(request_id: int, handle: bytes, offset: int, length: int) -> dict:
    return client(packet(sftp.READ, request_id, string(handle), u64(offset), u32(length)))


def data(request_id: int, chunk: bytes) -> dict:
    return server(packet(sftp.DATA, request_id, string(chunk)))


def status(request_id: int, code: int = sftp.OK, channel: str = "0", **attributes: str) -> dict:
    return server(packet(sftp.STATUS, request_id, u32(code), string(""), string("")), channel, **attributes)


def closed(request_id: int, handle: bytes, content: bytes | None, channel: str = "0", **attributes: str) -> list[dict]:
    record = recorded(content) if content is not None else {}
    return [client(packet(sftp.CLOSE, request_id, string(handle)), channel),
            status(request_id, channel=channel, **{**record, **attributes})]


UPLOAD = sftp.WRITE_FLAG | sftp.CREAT | sftp.TRUNC


def test_an_upload_is_the_writes_at_their_offsets_even_out_of_order():
    h = b"\0\0\0\1"
    messages = [*opened(1, "/srv/a.txt", UPLOAD, h), write(3, h, 6, b"world"), write(2, h, 0, b"hello "),
                status(2), status(3), *closed(4, h, b"hello world")]
    [file] = extract_files(messages)
    assert (file.path, file.mode, file.data, file.problem()) == ("/srv/a.txt", "upload", b"hello world", None)


def test_a_download_is_the_data_answers_at_their_read_offsets():
    h = b"H"
    content = bytes(range(256)) * 3
    messages = [*opened(1, "/srv/b.bin", sftp.READ_FLAG, h), read(2, h, 0, 512), read(3, h, 512, 512),
                read(4, h, 1024, 512), data(3, content[512:]), data(2, content[:512]), status(4, sftp.EOF),
                *closed(5, h, content)]
    [file] = extract_files(messages)
    assert (file.mode, file.data, file.sha256, file.problem()) == (
        "download", content, hashlib.sha256(content).hexdigest(), None)


def test_reused_handles_channels_and_other_messages_are_kept_apart():
    h = b"\0\0\0\0"
    shell = {"type": "channel:data", "data": b"ls\r", "attributes": {}, "channel": "1", "direction": "client"}
    messages = [shell, *opened(1, "/a", UPLOAD, h), *opened(1, "/b", UPLOAD, h, channel="2"),
                write(2, h, 0, b"first a"), write(2, h, 0, b"only b", channel="2"),
                client(packet(sftp.OPENDIR, 3, string("/"))), server(packet(sftp.HANDLE, 3, string(b"D"))),
                *closed(4, h, b"first a"), *closed(4, h, b"only b", channel="2"),
                *opened(5, "/a", UPLOAD, h), write(6, h, 0, b"second a"), *closed(7, h, b"second a")]
    files = extract_files(messages)
    assert [(f.path, f.data) for f in files] == [("/a", b"first a"), ("/b", b"only b"), ("/a", b"second a")]
    assert select(files, "/a").data == b"second a" and select(files, "/a", nth=1).data == b"first a"
    with pytest.raises(NoSuchTransfer, match=r"no SFTP transfer of '/c' in this session \(transferred: /a, /b\)"):
        select(files, "/c")
    with pytest.raises(NoSuchTransfer, match="--nth 3: '/a' was transferred 2 time"):
        select(files, "/a", nth=3)


def test_what_differs_from_the_record_is_named():
    h = b"h"
    body = [*opened(1, "/x", UPLOAD, h), write(2, h, 0, b"evidence")]
    [tampered] = extract_files([*body, *closed(3, h, b"evidenCe")])
    assert tampered.problem() == (f"SHA-256 {hashlib.sha256(b'evidence').hexdigest()} != recorded "
                                  f"{hashlib.sha256(b'evidenCe').hexdigest()}")
    [short] = extract_files([*body, *closed(3, h, b"evidence", size="9")])
    assert short.problem() == "size 8 != recorded 9"
    [unclosed] = extract_files(body)
    assert (unclosed.data, unclosed.problem()) == (b"evidence", "no SHA-256 recorded (the handle was never closed)")
    assert extract_files([]) == []
    with pytest.raises(NoSuchTransfer, match=r"\(transferred: none\)"):
        select([], "/x")


def test_a_refused_open_leaves_no_file():
    messages = [client(packet(sftp.OPEN, 1, string("/etc/shadow"), u32(UPLOAD), u32(0))),
                status(1, sftp.PERMISSION_DENIED)]
    assert extract_files(messages) == []

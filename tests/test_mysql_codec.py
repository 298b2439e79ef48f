"""The MySQL codec without a network: framing with sequence ids and 16 MiB continuation, packet bodies,
the command phase, the authentication plugins (checked against PyMySQL's independent implementation),
and the `custody init` MySQL entry."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymysql import _auth

from custody.config import load_config
from custody.init import initialise
from ingest.protocols.mysql import auth
from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.conversation import Conversation
from ingest.protocols.mysql.packets import MAX_PIECE, PacketReader, ProtocolViolation, make, packet
from proxy.core.registry import protocol_for


@given(st.binary(max_size=600), st.integers(1, 97))
def test_packets_split_anywhere_come_back_whole(payload, cut):
    wire = packet(3, payload) + packet(4, b"next")
    reader = PacketReader("client")
    got = []
    for i in range(0, len(wire), cut):
        got += reader.feed(wire[i:i + cut])
    assert [(p.seq, p.payload) for p in got] == [(3, payload), (4, b"next")]
    assert b"".join(p.data for p in got) == wire


def test_16_mib_continuation_and_its_sequence_ids():
    payload = secrets.token_bytes(MAX_PIECE) + b"tail"
    wire = packet(0, payload)
    assert len(wire) == len(payload) + 8 and wire[3] == 0 and wire[4 + MAX_PIECE + 3] == 1
    (p,) = PacketReader("client", 1 << 25).feed(wire)
    assert p.payload == payload and p.data == wire and p.last_seq == 1
    exact = packet(5, b"x" * MAX_PIECE)  # exactly 16 MiB - 1: an empty packet ends it
    assert exact.endswith(b"\x00\x00\x00\x06")
    bad = bytearray(wire)
    bad[4 + MAX_PIECE + 3] = 9
    with pytest.raises(ProtocolViolation, match="out of order"):
        PacketReader("client", 1 << 25).feed(bytes(bad))
    with pytest.raises(ProtocolViolation, match="more than"):
        PacketReader("client", 1024).feed(wire[:100])


def test_handshake_round_trip_and_response():
    h = m.Handshake("5.5.5-10.11.0-MariaDB", 7, bytes(range(1, 21)), m.RELAYED_CAPABILITIES, 45, 2, auth.NATIVE)
    assert m.decode_handshake(m.handshake(h)) == h
    assert not m.RELAYED_CAPABILITIES & m.CLIENT_COMPRESS
    caps = m.RELAYED_CAPABILITIES
    r = m.decode_handshake_response(m.handshake_response(caps, 1 << 24, 45, "alice", b"\x01\x02", "shop", auth.CLEAR,
                                                         {"program_name": "app"}))
    assert (r.user, r.auth_response, r.database, r.auth_plugin, r.attributes) == (
        "alice", b"\x01\x02", "shop", auth.CLEAR, {"program_name": "app"})
    assert m.decode_handshake_response(m.ssl_request(caps, 1 << 24, 45)).ssl_request


def test_auth_plugins_agree_with_pymysql():
    scramble = bytes(range(40, 60))
    assert auth.native_password("pw", scramble) == _auth.scramble_native_password(b"pw", scramble)
    assert auth.caching_sha2_password("pw", scramble) == _auth.scramble_caching_sha2(b"pw", scramble)
    nonce = secrets.token_bytes(32)
    assert auth.ed25519_password("pw", nonce) == _auth.ed25519_password(b"pw", nonce)


def test_binary_rows_and_execute_parameters_decode_by_type():
    columns = [m.Column("", "t", "t", n, n, 33, 0, kind, 0, 0) for n, kind in (("a", 3), ("b", 253), ("c", 10))]
    row = m.binary_row([(7).to_bytes(4, "little"), m.binary_string(b"hi"), None])
    assert m.decode_binary_row(row, columns) == [(7).to_bytes(4, "little"), b"\x02hi", None]
    assert m.binary_text(3, (7).to_bytes(4, "little")) == "7"
    assert m.binary_text(10, b"\x04\xd2\x07\x05\x11") == "2002-05-17"
    payload = (b"\x17" + (1).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + b"\x04\x01"
               + b"\x08\x00\xfd\x00\x06\x00" + (-5).to_bytes(8, "little", signed=True) + m.binary_string("é".encode()))
    execute = m.decode_execute(payload, 3, None)
    assert execute.texts() == ["-5", "é", None]
    with pytest.raises(ProtocolViolation):
        m.decode_execute(payload[:-1], 3, None)


def test_conversation_follows_a_result_set_with_and_without_deprecate_eof():
    for deprecate in (False, True):
        conversation = Conversation(m.CLIENT_DEPRECATE_EOF if deprecate else 0)
        query = make(0, b"\x03SELECT 1")
        conversation.sent(query)
        column = (b"\x03def" + b"\x00" * 2 + b"\x00\x00" + b"\x011" + b"\x00" + b"\x0c" + b"\x3f\x00"
                  + b"\x01\x00\x00\x00" + b"\x08" + b"\x81\x00" + b"\x00" + b"\x00\x00")
        end = m.ok(header=0xFE) if deprecate else b"\xfe\x00\x00\x02\x00"
        answers = [b"\x01", column] + ([] if deprecate else [b"\xfe\x00\x00\x02\x00"]) + [b"\x011", end]
        kinds = [conversation.server(make(seq, body))[0] for seq, body in enumerate(answers, start=1)]
        assert kinds == ["ColumnCount", "ColumnDefinition"] + ([] if deprecate else ["EOF"]) + ["TextRow", "EOF"]
        assert conversation.idle
        with pytest.raises(ProtocolViolation):
            conversation.server(make(1, b"\x00"))


def test_init_writes_a_commented_mysql_entry_that_loads(tmp_path):
    config = initialise(tmp_path / "c")
    text = config.read_text()
    start = text.index('# name = "local-mysql"') - len("# [[proxy]]\n")
    block = text[start:].split("\n\n")[0]
    keep = [line[2:] for line in block.splitlines() if not line.startswith(("# tls_", "# upstream_password", "# upstream_tls"))]
    config.write_text(text.replace(block, "\n".join(keep)))
    (entry,) = [p for p in load_config(config).proxies if p.protocol == "mysql"]
    protocol = protocol_for(entry, False)
    assert protocol.upstream == "127.0.0.1:3306/mysql" and protocol.settings.upstream.user == "root"


def _entries(*runs: tuple[str, list[dict]]) -> list:
    from ingest.protocols.mysql.render import RENDERER
    from ingest.protocols.render import Entry

    out = []
    for n, (direction, records) in enumerate(runs):
        if direction == "policy":
            out.append(Entry({"step": "policy", "seq": n}, None))
            continue
        step = RENDERER.step(direction, records, max_rows=10, reveal=None)
        out.append(Entry({"seq": n, "ts": n, "offset_s": 0.0, "direction": direction, "channel": None, **step}, records))
    return out


def test_replay_folds_prepare_and_execute_but_not_across_a_refusal_or_a_cursor():
    from ingest.protocols.mysql.render import RENDERER

    sql = "SELECT a FROM t WHERE id = ?"
    prepare = ("client", [{"type": "COM_STMT_PREPARE", "statement": sql, "data": b""}])
    prepared = ("server", [{"type": "PrepareOK", "attributes": {"statement_id": "3", "params": "2"}, "outcome": "ok",
                            "data": b""}])
    execute = ("client", [{"type": "COM_STMT_EXECUTE", "statement": sql, "parameters": ["1", None],
                           "attributes": {"statement_id": "3"}, "data": b""}])
    answer = ("server", [{"type": "ColumnDefinition", "attributes": {"name": "a", "type": "LONG"}, "data": b""},
                         {"type": "EOF", "command_tag": "0 rows", "rows": 0, "outcome": "ok", "data": b""}])
    steps = RENDERER.arrange(_entries(prepare, prepared, ("client", [{"type": "COM_STMT_RESET", "data": b"",
                                                                       "attributes": {"statement_id": "3"}}]),
                                      ("server", [{"type": "OK", "rows": 0, "outcome": "ok", "data": b""}]),
                                      execute, answer, execute, answer), max_rows=10, reveal=None)
    assert [s["step"] for s in steps] == ["statement", "statement"]
    first, second = (RENDERER.describe(s) for s in steps)
    assert first == ("SQL", sql, ["prepared as statement 3 (2 parameters), executed", 'parameters: ["1", null]',
                                  "→ 0 rows"])
    assert second == ("SQL", sql, ['parameters: ["1", null]', "→ 0 rows"]) and steps[1]["columns"] == ["a"]
    assert steps[0]["messages"] == ["COM_STMT_PREPARE", "COM_STMT_RESET", "COM_STMT_EXECUTE"]
    # a refused PREPARE (a policy step between) and an EXECUTE whose answer has not ended are left as they were
    refused = RENDERER.arrange(_entries(prepare, ("policy", []), ("server", [{"type": "ERR", "outcome": "error",
                                                                             "data": b""}])), max_rows=10, reveal=None)
    assert [s["step"] for s in refused] == ["statement", "policy", "error"]
    open_cursor = RENDERER.arrange(_entries(execute, ("server", answer[1][:1])), max_rows=10, reveal=None)
    assert [s["step"] for s in open_cursor] == ["statement", "result"]


def test_local_infile_only_for_the_file_the_statement_named():
    caps = m.RELAYED_CAPABILITIES
    conversation = Conversation(caps)
    query = make(0, b"\x03LOAD DATA LOCAL INFILE '/tmp/a.csv' INTO TABLE t")
    conversation.sent(query)
    assert conversation.server(make(1, b"\xfb/tmp/a.csv"))[0] == "LocalInfileRequest" and conversation.receiving_file
    with pytest.raises(ProtocolViolation):  # the client's file packets, not the target's, while it comes
        conversation.server(make(2, m.ok()))
    assert conversation.file_data(make(2, b"1,x\n"))[0] == "LocalInfileData"
    kind, fields = conversation.file_data(make(3, b""))
    assert (kind, fields["attributes"]["bytes"]) == ("LocalInfileEnd", "4") and not conversation.receiving_file
    assert conversation.server(make(4, m.ok(affected_rows=1)))[1]["rows"] == 1 and conversation.idle
    conversation.sent(query)  # refused by the policy: an empty file for the target, its answer swallowed
    conversation.server(make(1, b"\xfb/tmp/a.csv"))
    assert conversation.refuse_file() == (packet(2, b""), 1) and conversation.swallowing
    assert conversation.server(make(3, m.ok()))[0] == "OK" and conversation.idle and not conversation.swallowing
    for caps_, name in ((caps, b"/etc/passwd"), (caps & ~m.CLIENT_LOCAL_FILES, b"/tmp/a.csv")):
        rogue = Conversation(caps_)
        rogue.sent(query)
        with pytest.raises(ProtocolViolation):  # another file than the statement's, or a client that never agreed
            rogue.server(make(1, b"\xfb" + name))
    from ingest.protocols.mysql.render import RENDERER

    request = RENDERER.step("server", [{"type": "LocalInfileRequest", "attributes": {"file": "/tmp/a.csv"},
                                        "data": packet(1, b"\xfb/tmp/a.csv")}], max_rows=5, reveal=None)
    assert RENDERER.describe(request)[1] == "asks for the client's file /tmp/a.csv"
    sent = RENDERER.step("client", [{"type": "LocalInfileData", "data": packet(2, b"1,x\n") + packet(3, b"2,y\n")},
                                    {"type": "LocalInfileEnd", "data": packet(4, b""),
                                     "attributes": {"bytes": "8", "sha256": "ab"}}], max_rows=5, reveal=None)
    assert RENDERER.describe(sent) == ("FILE", "8 B of the client's file, 8 B in all, sha256 ab", [])

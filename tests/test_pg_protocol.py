"""The sans-I/O PostgreSQL protocol layer: framing, codecs, summaries.

Messages without an encoder are built here by hand (`frame`), from the
protocol documentation, so that decoders are checked against an oracle that
does not share their code.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterable

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ingest.protocols.postgres as pg
from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres import Message, MessageReader, ProtocolViolation, summarize

PG_ADDRESS = ("127.0.0.1", 5432)


def frame(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + struct.pack(">I", len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def int16(*values: int) -> bytes:
    return struct.pack(f">{len(values)}h", *values)


def int32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def value(raw: bytes | None) -> bytes:
    return int32(-1) if raw is None else int32(len(raw)) + raw


def parse_all(direction: pg.Direction, data: bytes) -> list[Message]:
    reader = MessageReader(direction)
    messages = reader.feed(data)
    reader.eof()
    return messages


def only(direction: pg.Direction, data: bytes, *, typed: bool = True) -> Message:
    """The one message `data` frames as (the client reader made typed unless asked)."""
    reader = MessageReader(direction)
    if typed:
        reader.start_typed()
    (message,) = reader.feed(data)
    reader.eof()
    assert message.data == data
    return message


# --- sample streams ----------------------------------------------------------

BIND = frame(
    b"B",
    cstr("")
    + cstr("s1")
    + struct.pack(">H", 3)
    + int16(0, 1, 0)
    + struct.pack(">H", 3)
    + value(b"42")
    + value(b"\x00\xff")
    + value(None)
    + struct.pack(">H", 1)
    + int16(1),
)
PARSE = frame(b"P", cstr("s1") + cstr("SELECT $1::int, $2, $3") + struct.pack(">HIII", 3, 23, 17, 0))
FUNCTION_CALL = frame(
    b"F", struct.pack(">I", 764) + struct.pack(">H", 1) + int16(1) + struct.pack(">H", 2) + value(b"\x00\x01") + value(b"/tmp/x") + int16(0)
)

CLIENT_TYPED = [
    m.query("SELECT 1"),
    PARSE,
    BIND,
    frame(b"D", b"S" + cstr("s1")),
    frame(b"E", cstr("") + int32(0)),
    frame(b"H", b""),
    frame(b"S", b""),
    frame(b"C", b"P" + cstr("p1")),
    FUNCTION_CALL,
    m.password_message("eyJ.token"),
    m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
    m.sasl_response(b"c=biws,r=abc,p=xyz"),
    frame(b"d", b"1\t2\n"),
    frame(b"c", b""),
    frame(b"f", cstr("aborted")),
    m.TERMINATE,
]
CLIENT_STREAM = m.startup_message({"user": "alice", "database": "prod", "application_name": "psql"}) + b"".join(CLIENT_TYPED)

ROW_DESCRIPTION = frame(
    b"T",
    struct.pack(">H", 2)
    + cstr("x") + struct.pack(">IhIhih", 0, 0, 23, 4, -1, 0)
    + cstr("name") + struct.pack(">IhIhih", 1259, 2, 25, -1, -1, 1),
)
SERVER_MESSAGES = [
    frame(b"R", int32(10) + cstr("SCRAM-SHA-256") + cstr("SCRAM-SHA-256-PLUS") + b"\x00"),
    frame(b"R", int32(11) + b"r=abc,s=salt,i=4096"),
    frame(b"R", int32(12) + b"v=proof"),
    frame(b"R", int32(5) + b"salt"),
    m.authentication_cleartext_password(),
    m.authentication_ok(),
    frame(b"S", cstr("server_version") + cstr("15.2")),
    m.backend_key_data(4242, b"\x01\x02\x03\x04"),
    frame(b"v", int32(0, 1) + cstr("_pq_.compression")),
    m.ready_for_query("I"),
    frame(b"1", b""),
    frame(b"t", struct.pack(">HI", 1, 23)),
    frame(b"2", b""),
    ROW_DESCRIPTION,
    m.data_row([b"1", None]),
    frame(b"C", cstr("SELECT 1")),
    frame(b"3", b""),
    frame(b"n", b""),
    frame(b"I", b""),
    frame(b"s", b""),
    m.notice_response(severity="NOTICE", code="00000", message="hello", detail="d"),
    m.error_response(severity="ERROR", code="22012", message="division by zero", position="8"),
    frame(b"A", int32(77) + cstr("jobs") + cstr("{\"id\": 1}")),
    frame(b"G", b"\x00" + struct.pack(">H", 2) + int16(0, 0)),
    frame(b"H", b"\x01" + struct.pack(">H", 1) + int16(1)),
    frame(b"W", b"\x00" + struct.pack(">H", 0)),
    frame(b"d", b"row\n"),
    frame(b"c", b""),
    frame(b"V", value(b"\x00\x00\x00\x01")),
    m.ready_for_query("T"),
]
SERVER_STREAM = b"".join(SERVER_MESSAGES)

CLIENT_NAMES = [
    "StartupMessage", "Query", "Parse", "Bind", "Describe", "Execute", "Flush", "Sync", "Close",
    "FunctionCall", "PasswordMessage", "PasswordMessage", "PasswordMessage", "CopyData",
    "CopyDone", "CopyFail", "Terminate",
]  # fmt: skip
SERVER_NAMES = [
    "AuthenticationRequest", "AuthenticationRequest", "AuthenticationRequest", "AuthenticationRequest",
    "AuthenticationRequest", "AuthenticationRequest", "ParameterStatus", "BackendKeyData",
    "NegotiateProtocolVersion", "ReadyForQuery", "ParseComplete", "ParameterDescription",
    "BindComplete", "RowDescription", "DataRow", "CommandComplete", "CloseComplete", "NoData",
    "EmptyQueryResponse", "PortalSuspended", "NoticeResponse", "ErrorResponse",
    "NotificationResponse", "CopyInResponse", "CopyOutResponse", "CopyBothResponse", "CopyData",
    "CopyDone", "FunctionCallResponse", "ReadyForQuery",
]  # fmt: skip


# --- framing -------------------------------------------------------------------


def test_client_stream_frames_every_message_with_exact_bytes() -> None:
    messages = parse_all("client", CLIENT_STREAM)
    assert [message.type for message in messages] == CLIENT_NAMES
    assert b"".join(message.data for message in messages) == CLIENT_STREAM
    assert [message.data for message in messages[1:]] == CLIENT_TYPED


def test_server_stream_frames_every_message_with_exact_bytes() -> None:
    messages = parse_all("server", SERVER_STREAM)
    assert [message.type for message in messages] == SERVER_NAMES
    assert [message.data for message in messages] == SERVER_MESSAGES


def test_payload_is_the_body_after_the_header() -> None:
    startup, query = parse_all("client", m.startup_message({"user": "u"}) + m.query("SELECT 1"))
    assert startup.payload == startup.data[4:] and startup.payload[:4] == b"\x00\x03\x00\x00"
    assert query.payload == b"SELECT 1\x00"


def test_client_reader_leaves_startup_after_the_startup_message() -> None:
    reader = MessageReader("client")
    assert reader.in_startup
    reader.feed(m.startup_message({"user": "u"})[:-1])
    assert reader.in_startup and reader.buffered > 0
    reader.feed(m.startup_message({"user": "u"})[-1:])
    assert not reader.in_startup and reader.buffered == 0
    assert [message.type for message in reader.feed(m.query("SELECT 1"))] == ["Query"]


def test_start_typed_switches_explicitly() -> None:
    reader = MessageReader("client")
    reader.start_typed()
    assert [message.type for message in reader.feed(m.query("SELECT 1"))] == ["Query"]


def test_ssl_request_then_startup_after_the_answer() -> None:
    reader = MessageReader("client")
    assert [message.type for message in reader.feed(m.SSL_REQUEST)] == ["SSLRequest"]
    assert reader.in_startup  # the proxy answers SSL_ALLOWED / ENCRYPTION_DENIED, then:
    assert [message.type for message in reader.feed(m.GSSENC_REQUEST)] == ["GSSENCRequest"]
    assert [message.type for message in reader.feed(m.startup_message({"user": "u"}))] == ["StartupMessage"]
    assert (m.SSL_ALLOWED, m.GSSENC_ALLOWED, m.ENCRYPTION_DENIED) == (b"S", b"G", b"N")


def test_cancel_request_is_a_startup_packet() -> None:
    (message,) = parse_all("client", m.cancel_request(1234, b"\x00\x00\x00\x07"))
    assert message.type == "CancelRequest"
    assert m.decode_cancel_request(message.payload) == m.CancelRequest(1234, b"\x00\x00\x00\x07")


def feed_in_chunks(direction: pg.Direction, stream: bytes, cuts: Iterable[int]) -> list[Message]:
    reader = MessageReader(direction)
    messages: list[Message] = []
    start = 0
    for cut in sorted(cuts) + [len(stream)]:
        messages += reader.feed(stream[start:cut])
        start = cut
    reader.eof()
    return messages


@pytest.mark.parametrize("direction, stream", [("client", CLIENT_STREAM), ("server", SERVER_STREAM)])
def test_byte_by_byte_feeding_yields_the_same_messages(direction: pg.Direction, stream: bytes) -> None:
    assert feed_in_chunks(direction, stream, range(len(stream))) == parse_all(direction, stream)


@settings(max_examples=200)
@given(st.data())
def test_random_splits_yield_the_same_messages(data: st.DataObject) -> None:
    direction, stream = data.draw(st.sampled_from([("client", CLIENT_STREAM), ("server", SERVER_STREAM)]))
    cuts = data.draw(st.sets(st.integers(0, len(stream)), max_size=60))
    assert feed_in_chunks(direction, stream, cuts) == parse_all(direction, stream)


def test_large_message_in_small_chunks() -> None:
    """16 MiB in 4 KiB pieces arrives whole (its linear cost is measured in bench/pg_protocol.py)."""
    big = m.data_row([b"x" * (16 << 20)])
    reader = MessageReader("server")
    for offset in range(0, len(big), 4096):
        messages = reader.feed(big[offset : offset + 4096])
    assert [message.data for message in messages] == [big]


BULK_PIECES = {
    "DataRow": lambda n: m.data_row([b"v" * n, None]),
    "CopyData": lambda n: frame(b"d", b"c" * n),
    "CommandComplete": lambda n: m.command_complete(f"SELECT {n}"),
    "ReadyForQuery": lambda n: frame(b"Z", b"I"),
}


def fed(reader: MessageReader, stream: bytes, cuts: Iterable[int]) -> list[list[Message]]:
    """What each `feed` of `stream`, cut at `cuts`, returned."""
    feeds, start = [], 0
    for cut in sorted(cuts) + [len(stream)]:
        feeds.append(reader.feed(stream[start:cut]))
        start = cut
    reader.eof()
    return feeds


@settings(max_examples=300)
@given(st.data())
def test_a_reader_that_coalesces_runs_gives_the_same_messages_in_runs(data: st.DataObject) -> None:
    """DataRows and CopyData come as one Message per run of a feed, `count` of them back to back: cut apart
    again they are exactly what a plain reader gives, and a run is never split within one feed."""
    pieces = data.draw(st.lists(st.tuples(st.sampled_from(sorted(BULK_PIECES)), st.integers(0, 40)), max_size=40))
    stream = b"".join(BULK_PIECES[kind](n) for kind, n in pieces)
    cuts = data.draw(st.sets(st.integers(0, len(stream)), max_size=12))
    plain = [x for feed in fed(MessageReader("server"), stream, cuts) for x in feed]
    feeds = fed(MessageReader("server", runs=pg.RUN_TYPES), stream, cuts)
    coalesced = [x for feed in feeds for x in feed]
    assert pg.single_messages(coalesced) == plain
    assert b"".join(x.data for x in coalesced) == stream
    assert sum(x.count for x in coalesced) == len(plain)
    for feed in feeds:
        assert all(x.count == 1 or x.type in pg.RUN_TYPES for x in feed)
        assert not any(a.type == b.type in pg.RUN_TYPES for a, b in zip(feed, feed[1:]))


def test_a_run_waits_for_its_incomplete_message_and_checks_each_one() -> None:
    rows = [m.data_row([str(n).encode()]) for n in range(3)]
    reader = MessageReader("server", runs=pg.RUN_TYPES)
    assert reader.feed(rows[0] + rows[1] + rows[2][:-1]) == [Message("DataRow", rows[0] + rows[1], 2)]
    assert reader.buffered == len(rows[2]) - 1
    assert reader.feed(rows[2][-1:]) == [Message("DataRow", rows[2])]
    bad = b"D" + struct.pack(">I", 5) + b"x"  # a DataRow is at least 6 long (its column count)
    error = violation_of(lambda: MessageReader("server", runs=pg.RUN_TYPES).feed(rows[0] + rows[1] + bad))
    assert str(error) == str(violation_of(lambda: MessageReader("server").feed(rows[0] + rows[1] + bad)))


def test_message_size_limits_are_configurable() -> None:
    message = m.query("x" * 100)  # length field: 4 + 100 + NUL = 105
    assert typed_reader("client", max_message_size=105).feed(message)[0].data == message
    reader = typed_reader("client", max_message_size=104)
    assert violation_of(lambda: reader.feed(message)).code == "08P01"
    server = MessageReader("server", max_message_size=104)
    assert violation_of(lambda: server.feed(m.data_row([b"x" * 100]))).code == "08P01"
    assert MessageReader("client").max_message_size == 1 << 20
    assert MessageReader("server").max_message_size == 64 << 20


def typed_reader(direction: pg.Direction, **options: int) -> MessageReader:
    reader = MessageReader(direction, **options)
    reader.start_typed()
    return reader


# --- violations -------------------------------------------------------------------


def violation_of(action: Callable[[], object]) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as caught:
        action()
    return caught.value


@pytest.mark.parametrize(
    "direction, data",
    [
        pytest.param("client", b"Q" + struct.pack(">I", 3) + b"x", id="length below 4"),
        pytest.param("client", b"Q" + struct.pack(">I", 0xFFFFFFFF), id="negative length"),
        pytest.param("client", b"Q" + struct.pack(">I", (1 << 20) + 1), id="client length over max"),
        pytest.param("server", b"D" + struct.pack(">I", (64 << 20) + 1), id="server length over max"),
        pytest.param("client", b"S" + struct.pack(">I", 5) + b"\x00", id="Sync is exactly 4"),
        pytest.param("server", b"Z" + struct.pack(">I", 4), id="ReadyForQuery is exactly 5"),
        pytest.param("client", b"D" + struct.pack(">I", 20_000), id="Describe is small"),
        pytest.param("client", b"Z" + struct.pack(">I", 5) + b"I", id="server type from client"),
        pytest.param("server", b"Q" + struct.pack(">I", 5) + b"\x00", id="client type from server"),
        pytest.param("server", b"\x00\x00\x00\x00\x08", id="zero type byte"),
    ],
)
def test_typed_framing_violations(direction: pg.Direction, data: bytes) -> None:
    reader = typed_reader(direction)
    assert violation_of(lambda: reader.feed(data)).code == "08P01"


@pytest.mark.parametrize(
    "packet, code",
    [
        pytest.param(struct.pack(">ii", 7, 196608), "08P01", id="startup length below 8"),
        pytest.param(struct.pack(">ii", 10_001, 196608), "08P01", id="startup over 10000"),
        pytest.param(struct.pack(">ii", 8, 131072), "0A000", id="protocol 2.0"),
        pytest.param(struct.pack(">ii", 8, 0x00040000), "0A000", id="protocol 4.0"),
        pytest.param(struct.pack(">iI", 8, 80877105), "0A000", id="unknown request code"),
        pytest.param(struct.pack(">iI", 12, 80877103) + b"xxxx", "08P01", id="long SSLRequest"),
        pytest.param(struct.pack(">iIi", 12, 80877102, 1), "08P01", id="cancel without key"),
        pytest.param(struct.pack(">iIi", 12 + 257, 80877102, 1), "08P01", id="cancel key too long"),
        pytest.param(m.SSL_REQUEST + b"Q", "08P01", id="plaintext after SSLRequest"),
        pytest.param(m.GSSENC_REQUEST + m.startup_message({}), "08P01", id="data after GSSENCRequest"),
    ],
)
def test_startup_violations(packet: bytes, code: str) -> None:
    reader = MessageReader("client")
    assert violation_of(lambda: reader.feed(packet)).code == code


def test_max_startup_size_is_configurable() -> None:
    packet = m.startup_message({"user": "u" * 100})
    assert MessageReader("client", max_startup_size=len(packet)).feed(packet)
    assert violation_of(lambda: MessageReader("client", max_startup_size=len(packet) - 1).feed(packet))


@pytest.mark.parametrize(
    "direction, data",
    [
        ("client", m.startup_message({"user": "u"})[:-1]),
        ("client", b"\x00\x00"),
        ("client", m.startup_message({"user": "u"}) + m.query("SELECT 1")[:-3]),
        ("server", m.ready_for_query("I")[:3]),
        ("server", m.data_row([b"abc"])[:-1]),
    ],
)
def test_truncated_stream_at_eof(direction: pg.Direction, data: bytes) -> None:
    reader = MessageReader(direction)
    reader.feed(data)
    assert violation_of(reader.eof).code == "08P01"


def test_clean_eof_is_quiet() -> None:
    reader = MessageReader("server")
    reader.feed(m.ready_for_query("I"))
    reader.eof()


def test_reader_stays_broken_after_a_violation() -> None:
    reader = typed_reader("client")
    first = violation_of(lambda: reader.feed(b"?\x00\x00\x00\x04"))
    assert violation_of(lambda: reader.feed(m.query("SELECT 1"))) is first
    assert violation_of(reader.eof) is first


def test_unknown_direction_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        MessageReader("sideways")  # type: ignore[arg-type]


# --- decoders of messages the proxy only reads -----------------------------------


def test_decode_parse() -> None:
    assert m.decode_parse(only("client", PARSE).payload) == m.Parse("s1", "SELECT $1::int, $2, $3", (23, 17, 0))


def test_decode_bind_renders_text_binary_and_null() -> None:
    assert m.decode_bind(only("client", BIND).payload) == m.Bind("", "s1", (0, 1, 0), ("42", "\\x00ff", None), (1,))


@pytest.mark.parametrize(
    "formats, expected",
    [((), ("ab", "é")), ((0,), ("ab", "é")), ((1,), ("\\x6162", "\\xc3a9")), ((1, 0), ("\\x6162", "é"))],
)
def test_bind_format_codes_apply_like_postgres(formats: tuple[int, ...], expected: tuple[str, ...]) -> None:
    payload = (
        cstr("p") + cstr("") + struct.pack(">H", len(formats)) + int16(*formats)
        + struct.pack(">H", 2) + value(b"ab") + value("é".encode()) + struct.pack(">H", 0)
    )  # fmt: skip
    assert m.decode_bind(payload).parameters == expected


def test_decode_execute_describe_close() -> None:
    assert m.decode_execute(cstr("p1") + int32(50)) == m.Execute("p1", 50)
    assert m.decode_describe(b"S" + cstr("s1")) == m.Describe("statement", "s1")
    assert m.decode_close(b"P" + cstr("p1")) == m.Close("portal", "p1")
    assert m.decode_close(b"P" + cstr("p1")) != m.Describe("portal", "p1")


def test_decode_function_call() -> None:
    assert m.decode_function_call(only("client", FUNCTION_CALL).payload) == m.FunctionCall(
        764, (1,), ("\\x0001", "\\x2f746d702f78"), 0
    )


def test_decode_copy_fail() -> None:
    assert m.decode_copy_fail(cstr("aborted")) == m.CopyFail("aborted")


@pytest.mark.parametrize(
    "payload, expected",
    [
        (int32(0), m.AuthenticationRequest("Ok")),
        (int32(3), m.AuthenticationRequest("CleartextPassword")),
        (int32(5) + b"\x01\x02\x03\x04", m.AuthenticationRequest("MD5Password", salt=b"\x01\x02\x03\x04")),
        (int32(10) + cstr("SCRAM-SHA-256") + b"\x00", m.AuthenticationRequest("SASL", mechanisms=("SCRAM-SHA-256",))),
        (int32(11) + b"r=1", m.AuthenticationRequest("SASLContinue", data=b"r=1")),
        (int32(12) + b"v=2", m.AuthenticationRequest("SASLFinal", data=b"v=2")),
        (int32(7), m.AuthenticationRequest("GSS")),
    ],
)
def test_decode_authentication_variants(payload: bytes, expected: m.AuthenticationRequest) -> None:
    assert m.decode_authentication(payload) == expected


def test_decode_server_messages() -> None:
    assert m.decode_parameter_status(cstr("TimeZone") + cstr("UTC")) == m.ParameterStatus("TimeZone", "UTC")
    assert m.decode_row_description(only("server", ROW_DESCRIPTION).payload) == m.RowDescription(
        (m.FieldDescription("x", 0, 0, 23, 4, -1, 0), m.FieldDescription("name", 1259, 2, 25, -1, -1, 1))
    )
    assert m.decode_notification_response(int32(7) + cstr("ch") + cstr("hi")) == m.NotificationResponse(7, "ch", "hi")
    assert m.decode_copy_response(b"\x01" + struct.pack(">H", 2) + int16(1, 1)) == m.CopyResponse(1, (1, 1))
    assert m.decode_parameter_description(struct.pack(">HII", 2, 23, 25)) == m.ParameterDescription((23, 25))


@pytest.mark.parametrize(
    "tag, rows",
    [
        ("SELECT 5", 5), ("INSERT 0 3", 3), ("UPDATE 2", 2), ("DELETE 0", 0), ("COPY 10", 10),
        ("MERGE 4", 4), ("FETCH 7", 7), ("MOVE 1", 1), ("CREATE TABLE", None), ("BEGIN", None),
        ("SELECT", None), ("SELECT ²", None), ("SELECT " + "9" * 30, None), ("SELECT 99999999999999999999", None),
    ],
)  # fmt: skip
def test_command_complete_row_count(tag: str, rows: int | None) -> None:
    assert m.decode_command_complete(cstr(tag)) == m.CommandComplete(tag, rows)


@pytest.mark.parametrize(
    "decode, payload",
    [
        (m.decode_query, b"SELECT 1"),  # unterminated
        (m.decode_query, b"SELECT 1\x00x"),  # trailing bytes
        (m.decode_parse, cstr("") + cstr("q") + struct.pack(">HI", 2, 23)),
        (m.decode_bind, cstr("") + cstr("") + struct.pack(">H", 2) + int16(0, 0) + struct.pack(">H", 1) + value(b"1") + b"\x00\x00"),
        (m.decode_bind, cstr("") + cstr("") + b"\x00\x00" + struct.pack(">H", 1) + int32(-2) + b"\x00\x00"),
        (m.decode_bind, cstr("") + cstr("") + b"\x00\x00" + struct.pack(">H", 1) + int32(10) + b"ab\x00\x00"),
        (m.decode_describe, b"X" + cstr("s")),
        (m.decode_close, b""),
        (m.decode_startup_message, b"\x00\x03\x00\x00user\x00u"),
        (m.decode_startup_message, b"\x00\x03\x00\x00user\x00\x00"),
        (m.decode_authentication, int32(6)),
        (m.decode_authentication, int32(5) + b"\x01"),
        (m.decode_authentication, int32(0) + b"\x00"),
        (m.decode_authentication, int32(10) + cstr("SCRAM-SHA-256")),
        (m.decode_ready_for_query, b"X"),
        (m.decode_ready_for_query, b""),
        (m.decode_data_row, struct.pack(">H", 2) + value(b"a")),
        (m.decode_error_response, b"Mmissing terminator"),
        (m.decode_error_response, b""),
        (m.decode_row_description, struct.pack(">H", 1) + cstr("x")),
        (m.decode_negotiate_protocol_version, int32(0, 2) + cstr("a")),
        (m.decode_cancel_request, struct.pack(">Ii", 80877103, 1)),
        (m.decode_sasl_initial_response, cstr("SCRAM-SHA-256") + int32(5) + b"ab"),
    ],
)  # fmt: skip
def test_malformed_bodies_raise_protocol_violation(decode: Callable[[bytes], object], payload: bytes) -> None:
    assert violation_of(lambda: decode(payload)).code == "08P01"


# --- encoder / decoder round trips ---------------------------------------------

protocol_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
int32s = st.integers(-(2**31), 2**31 - 1)
cancel_keys = st.binary(min_size=4, max_size=256)


@given(st.dictionaries(protocol_text.filter(bool), protocol_text, max_size=8), st.integers(0, 0xFFFF))
def test_startup_message_round_trip(parameters: dict[str, str], minor: int) -> None:
    message = only("client", m.startup_message(parameters, (3, minor)), typed=False)
    assert message.type == "StartupMessage"
    assert m.decode_startup_message(message.payload) == m.StartupMessage((3, minor), parameters)


@given(int32s, cancel_keys)
def test_cancel_request_round_trip(process_id: int, secret: bytes) -> None:
    message = only("client", m.cancel_request(process_id, secret), typed=False)
    assert m.decode_cancel_request(message.payload) == m.CancelRequest(process_id, secret)


@given(protocol_text)
def test_query_round_trip(sql: str) -> None:
    assert m.decode_query(only("client", m.query(sql)).payload) == m.Query(sql)


@given(protocol_text, protocol_text, st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_parse_round_trip(name: str, sql: str, oids: list[int]) -> None:
    message = only("client", m.parse(name, sql, oids))
    assert message.type == "Parse" and m.decode_parse(message.payload) == m.Parse(name, sql, tuple(oids))


@given(st.lists(st.none() | st.text(max_size=20), max_size=8), protocol_text, protocol_text)
def test_extended_query_encoders_round_trip(parameters: list[str | None], statement: str, portal: str) -> None:
    encoded = [None if p is None else p.encode() for p in parameters]
    data = m.bind(encoded, statement, portal) + m.execute(portal, 5) + m.SYNC
    bind, execute, sync = pg.split_run("client", {"data": data})
    assert m.decode_bind(bind.payload) == m.Bind(portal, statement, (), tuple(parameters), ())
    assert m.decode_execute(execute.payload) == m.Execute(portal, 5) and sync.type == "Sync"


def test_result_encoders_round_trip() -> None:
    described = only("server", m.row_description(["id", m.FieldDescription("n", 16384, 2, 23, 4, -1, 1)]))
    assert m.decode_row_description(described.payload).fields == (
        m.FieldDescription("id", 0, 0, m.TEXT_OID, -1, -1, 0), m.FieldDescription("n", 16384, 2, 23, 4, -1, 1))
    assert m.decode_command_complete(only("server", m.command_complete("SELECT 3")).payload).rows == 3


@given(protocol_text)
def test_password_message_round_trip(password: str) -> None:
    message = only("client", m.password_message(password))
    assert message.type == "PasswordMessage"
    assert m.decode_password_message(message.payload) == m.PasswordMessage(password)


@given(protocol_text, st.none() | st.binary(max_size=64), st.binary(max_size=64))
def test_sasl_round_trips(mechanism: str, initial: bytes | None, response: bytes) -> None:
    first = only("client", m.sasl_initial_response(mechanism, initial))
    assert m.decode_sasl_initial_response(first.payload) == m.SASLInitialResponse(mechanism, initial)
    assert m.decode_sasl_response(only("client", m.sasl_response(response)).payload) == m.SASLResponse(response)


def test_authentication_encoders_round_trip() -> None:
    assert m.decode_authentication(only("server", m.authentication_ok()).payload).method == "Ok"
    request = only("server", m.authentication_cleartext_password())
    assert m.decode_authentication(request.payload) == m.AuthenticationRequest("CleartextPassword")


@given(int32s, cancel_keys)
def test_backend_key_data_round_trip(process_id: int, secret: bytes) -> None:
    message = only("server", m.backend_key_data(process_id, secret))
    assert m.decode_backend_key_data(message.payload) == m.BackendKeyData(process_id, secret)


@given(st.sampled_from("ITE"))
def test_ready_for_query_round_trip(status: str) -> None:
    assert m.decode_ready_for_query(only("server", m.ready_for_query(status)).payload) == m.ReadyForQuery(status)


@given(st.lists(st.none() | st.binary(max_size=300), max_size=30))
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    assert m.decode_data_row(only("server", m.data_row(values)).payload) == m.DataRow(tuple(values))


diagnostic_extras = st.dictionaries(
    st.sampled_from(["detail", "hint", "position", "where", "schema_name", "table_name", "constraint_name", "routine"]),
    protocol_text,
)


@given(protocol_text, protocol_text, protocol_text, diagnostic_extras)
def test_error_and_notice_round_trip(severity: str, code: str, text: str, extras: dict[str, str]) -> None:
    expected = {"severity": severity, "severity_nonlocalized": severity, "code": code, "message": text, **extras}
    error = m.decode_error_response(only("server", m.error_response(severity=severity, code=code, message=text, **extras)).payload)
    assert error == m.ErrorResponse(expected)
    assert (error.severity, error.code, error.message) == (severity, code, text)
    notice = only("server", m.notice_response(severity=severity, code=code, message=text, **extras))
    assert notice.type == "NoticeResponse"
    assert m.decode_notice_response(notice.payload) == m.NoticeResponse(expected)


def test_error_response_is_what_postgres_sends() -> None:
    assert m.error_response(severity="FATAL", code="28P01", message="bad token") == frame(
        b"E", b"SFATAL\x00VFATAL\x00C28P01\x00Mbad token\x00\x00"
    )


@given(st.integers(0, 2**31 - 1), st.lists(protocol_text, max_size=5))
def test_negotiate_protocol_version_round_trip(minor: int, options: list[str]) -> None:
    message = only("server", m.negotiate_protocol_version(minor, options))
    assert m.decode_negotiate_protocol_version(message.payload) == m.NegotiateProtocolVersion(minor, tuple(options))


def test_fixed_messages_frame_as_themselves() -> None:
    assert only("client", m.TERMINATE).type == "Terminate"
    assert only("client", m.SSL_REQUEST, typed=False).type == "SSLRequest"
    assert only("client", m.GSSENC_REQUEST, typed=False).type == "GSSENCRequest"


@pytest.mark.parametrize(
    "encode",
    [
        lambda: m.query("a\x00b"),
        lambda: m.startup_message({"": "x"}),
        lambda: m.cancel_request(1, b"abc"),
        lambda: m.backend_key_data(1, b"x" * 257),
        lambda: m.ready_for_query("X"),
        lambda: m.data_row([b""] * 65536),
        lambda: m.error_response(severity="ERROR", code="XX000", message="m", colour="red"),
    ],
)
def test_encoders_refuse_what_the_protocol_cannot_carry(encode: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        encode()


# --- summaries ---------------------------------------------------------------------

RECORD_KEYS = {"type", "statement", "parameters", "command_tag", "rows", "error_code", "error_message", "attributes"}


def summaries(direction: pg.Direction, stream: bytes) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for message in parse_all(direction, stream):
        found.setdefault(message.type, []).append(summarize(message))
    return found


def test_summaries_have_exactly_the_record_keys() -> None:
    for direction, stream in (("client", CLIENT_STREAM), ("server", SERVER_STREAM)):
        for records in summaries(direction, stream).values():
            assert all(record.keys() == RECORD_KEYS for record in records)


def test_client_summaries() -> None:
    found = summaries("client", CLIENT_STREAM)
    assert found["StartupMessage"][0]["attributes"] == {
        "user": "alice", "database": "prod", "application_name": "psql", "protocol_version": "3.0",
    }  # fmt: skip
    assert found["Query"][0]["statement"] == "SELECT 1"
    parse = found["Parse"][0]
    assert parse["statement"] == "SELECT $1::int, $2, $3"
    assert parse["attributes"] == {"statement_name": "s1", "parameter_type_oids": "[23, 17, 0]"}
    bind = found["Bind"][0]
    assert bind["parameters"] == ["42", "\\x00ff", None]
    assert bind["attributes"] == {"portal": "", "statement_name": "s1"}
    assert found["Execute"][0]["attributes"] == {"portal": "", "max_rows": "0"}
    assert found["Describe"][0]["attributes"] == {"kind": "statement", "name": "s1"}
    assert found["Close"][0]["attributes"] == {"kind": "portal", "name": "p1"}
    assert found["FunctionCall"][0]["attributes"] == {"function_oid": "764"}
    assert found["CopyFail"][0]["error_message"] == "aborted"
    assert found["Sync"][0] == {key: ({} if key == "attributes" else None) for key in RECORD_KEYS} | {"type": "Sync"}


def test_secrets_are_never_summarized() -> None:
    for message in parse_all("client", CLIENT_STREAM):
        if message.type == "PasswordMessage":
            assert summarize(message) == summarize(Message("PasswordMessage", m.password_message("other")))
    (cancel,) = parse_all("client", m.cancel_request(9, b"SECRET-KEY"))
    assert "SECRET-KEY" not in repr(summarize(cancel))
    (key_data,) = parse_all("server", m.backend_key_data(9, b"SECRET-KEY"))
    assert summarize(key_data)["attributes"] == {"process_id": "9"}


def test_server_summaries() -> None:
    found = summaries("server", SERVER_STREAM)
    assert [r["attributes"].get("method") for r in found["AuthenticationRequest"]] == [
        "SASL", "SASLContinue", "SASLFinal", "MD5Password", "CleartextPassword", "Ok",
    ]  # fmt: skip
    assert found["AuthenticationRequest"][0]["attributes"]["mechanisms"] == '["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]'
    assert found["ParameterStatus"][0]["attributes"] == {"name": "server_version", "value": "15.2"}
    assert found["ReadyForQuery"][1]["attributes"] == {"transaction_status": "T"}
    assert found["RowDescription"][0]["attributes"] == {"columns": '["x", "name"]', "type_oids": "[23, 25]"}
    complete = found["CommandComplete"][0]
    assert (complete["command_tag"], complete["rows"]) == ("SELECT 1", 1)
    error = found["ErrorResponse"][0]
    assert (error["error_code"], error["error_message"]) == ("22012", "division by zero")
    assert error["attributes"] == {"severity": "ERROR", "severity_nonlocalized": "ERROR", "position": "8"}
    assert found["NoticeResponse"][0]["attributes"]["message"] == "hello"
    assert found["NotificationResponse"][0]["attributes"] == {"process_id": "77", "channel": "jobs", "payload": '{"id": 1}'}
    assert found["CopyInResponse"][0]["attributes"] == {"format": "0", "column_formats": "[0, 0]"}
    assert found["NegotiateProtocolVersion"][0]["attributes"] == {
        "newest_minor": "0", "unrecognized_options": '["_pq_.compression"]',
    }  # fmt: skip


# --- fuzzing: nothing but ProtocolViolation, ever ---------------------------------

DECODERS = [getattr(m, name) for name in m.__all__ if name.startswith("decode_")]


def exercise(message: Message) -> None:
    """Every decoder on every payload: a peer controls all of them."""
    assert message.data.endswith(message.payload)
    for decode in [summarize, *DECODERS]:
        try:
            decode(message if decode is summarize else message.payload)
        except ProtocolViolation as error:
            assert error.code == "08P01"


def drive(direction: pg.Direction, stream: bytes, cuts: list[int]) -> None:
    """Feed `stream` cut at `cuts`; framing must account for every byte it emits."""
    reader = MessageReader(direction, max_message_size=4096)
    framed = b""
    start = 0
    try:
        for cut in sorted(cuts) + [len(stream)]:
            for message in reader.feed(stream[start:cut]):
                exercise(message)
                framed += message.data
            start = cut
        reader.eof()
        assert framed == stream
    except ProtocolViolation as error:
        assert error.code in ("08P01", "0A000")
        assert stream.startswith(framed)


def mutate(data: st.DataObject, stream: bytes) -> bytes:
    if not stream:
        return data.draw(st.binary(min_size=1, max_size=16))
    operation = data.draw(st.sampled_from(["flip", "truncate", "length", "insert", "delete"]))
    position = data.draw(st.integers(0, max(len(stream) - 1, 0)))
    if operation == "flip":
        return stream[:position] + bytes([stream[position] ^ data.draw(st.integers(1, 255))]) + stream[position + 1 :]
    if operation == "truncate":
        return stream[:position]
    if operation == "length":
        length = data.draw(st.sampled_from([0, 3, 4, 5, 8, 100, 4096, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1))
        return stream[:position] + struct.pack(">I", length) + stream[position + 4 :]
    if operation == "insert":
        return stream[:position] + data.draw(st.binary(min_size=1, max_size=16)) + stream[position:]
    return stream[:position] + stream[position + data.draw(st.integers(1, 16)) :]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from(["client", "server"]), st.binary(max_size=600), st.data())
def test_random_bytes_raise_only_protocol_violation(direction: pg.Direction, stream: bytes, data: st.DataObject) -> None:
    drive(direction, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))


@FUZZ
@given(st.sampled_from(["client", "server"]), st.data())
def test_mutated_streams_raise_only_protocol_violation(direction: pg.Direction, data: st.DataObject) -> None:
    pieces = [CLIENT_STREAM[: len(CLIENT_STREAM) - len(b"".join(CLIENT_TYPED))]] if direction == "client" else []
    pool = CLIENT_TYPED if direction == "client" else SERVER_MESSAGES
    pieces += data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=12))
    stream = b"".join(pieces)
    for _ in range(data.draw(st.integers(1, 4))):
        stream = mutate(data, stream)
    drive(direction, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))


@FUZZ
@given(st.data())
def test_mutated_startup_packets_raise_only_protocol_violation(data: st.DataObject) -> None:
    packet = data.draw(
        st.sampled_from(
            [m.startup_message({"user": "u", "database": "d"}), m.cancel_request(1, b"\x00\x00\x00\x01"), m.SSL_REQUEST]
        )
    )
    stream = mutate(data, packet + m.query("SELECT 1"))
    drive("client", stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))


# --- the real PostgreSQL ----------------------------------------------------------


def read_until_ready(sock: socket.socket, reader: MessageReader) -> list[Message]:
    messages: list[Message] = []
    while not messages or messages[-1].type != "ReadyForQuery":
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        messages += reader.feed(chunk)
    return messages


def test_against_real_postgres() -> None:
    reader = MessageReader("server")
    with socket.create_connection(PG_ADDRESS, timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "postgres", "application_name": "custody-test"}))
        startup = read_until_ready(sock, reader)
        assert m.decode_authentication(startup[0].payload).method == "Ok"
        statuses = dict(
            (s.name, s.value) for s in (m.decode_parameter_status(x.payload) for x in startup if x.type == "ParameterStatus")
        )
        assert statuses["application_name"] == "custody-test"
        assert any(x.type == "BackendKeyData" for x in startup)

        sock.sendall(m.query("SELECT 1 AS x, 'a'::text"))
        description, row, complete, ready = read_until_ready(sock, reader)
        fields = m.decode_row_description(description.payload).fields
        assert [(f.name, f.type_oid, f.format) for f in fields] == [("x", 23, 0), ("text", 25, 0)]
        assert m.decode_data_row(row.payload) == m.DataRow((b"1", b"a"))
        assert m.decode_command_complete(complete.payload) == m.CommandComplete("SELECT 1", 1)
        assert m.decode_ready_for_query(ready.payload) == m.ReadyForQuery("I")

        sock.sendall(m.query("SELECT 1/0"))
        error, ready = read_until_ready(sock, reader)
        assert summarize(error)["error_code"] == "22012"
        sock.sendall(m.TERMINATE)
        assert sock.recv(1) == b""
    reader.eof()


class Recorder:
    """A byte relay between a real client and the real server, keeping both directions."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = {"client": bytearray(), "server": bytearray()}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(PG_ADDRESS)
        pumps = [
            threading.Thread(target=self._pump, args=(client, server, "client")),
            threading.Thread(target=self._pump, args=(server, client, "server")),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        client.close()
        server.close()
        self.listener.close()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str) -> None:
        while chunk := source.recv(65536):
            self.sent[direction] += chunk
            target.sendall(chunk)
        target.shutdown(socket.SHUT_WR)


def test_real_client_through_a_recording_relay() -> None:
    """psycopg's own extended-protocol bytes, with text and binary parameters."""
    recorder = Recorder()
    dsn = f"host=127.0.0.1 port={recorder.port} user=postgres dbname=postgres sslmode=disable gssencmode=disable"
    with psycopg.connect(dsn) as connection:
        connection.execute("SELECT %s::int, %b::bytea, %s::text", (7, b"\x00\xff", None))
    recorder.thread.join(timeout=10)

    client = [summarize(message) for message in parse_all("client", bytes(recorder.sent["client"]))]
    server_messages = parse_all("server", bytes(recorder.sent["server"]))
    server = [summarize(message) for message in server_messages]
    assert client[0]["type"] == "StartupMessage" and client[-1]["type"] == "Terminate"
    (parse,) = [record for record in client if record["type"] == "Parse"]
    assert parse["statement"] == "SELECT $1::int, $2::bytea, $3::text"
    (bind,) = [record for record in client if record["type"] == "Bind"]
    assert bind["parameters"] == ["\\x0007", "\\x00ff", None]  # psycopg binds a small int as binary int2
    (row,) = [message for message in server_messages if message.type == "DataRow"]
    assert m.decode_data_row(row.payload) == m.DataRow((b"7", b"\\x00ff", None))
    assert any(record["command_tag"] == "SELECT 1" and record["rows"] == 1 for record in server)

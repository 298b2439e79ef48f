"""The MySQL/MariaDB front end: its protocol state machine on the proxy core.

Phases: greeting (the proxy sends its own HandshakeV10; it offers TLS when
`tls_cert` is set, never compression) → login (the client's
HandshakeResponse41, after an SSLRequest and TLS when it asks) → token (the
proxy switches the client to `mysql_clear_password`, or asks a client that
answered with `caching_sha2_password` inside TLS for that plugin's full
authentication: either way the password is the OIDC token, taken in clear
only over TLS or from loopback) → verifying (the core
checks the token, its username claim must equal the MySQL user) → connecting
(the target's handshake; SSLRequest and TLS with `upstream_tls`; the proxy
logs in with the credentials it holds: mysql_native_password,
caching_sha2_password, client_ed25519) → relay.

In the relay phase every packet both ways is recorded: commands with their
statement text, COM_STMT_EXECUTE with its bound values decoded by type,
column definitions, rows (runs of one read folded into one record), OK
(affected rows, last insert id, warnings) and ERR (SQLSTATE, errno,
message). COM_QUERY, COM_STMT_PREPARE and COM_INIT_DB are operations the
policy decides; a refused one never reaches the target and the client gets
ERR 1142 (SQLSTATE 42000) from the proxy, in its turn, and the session goes
on. LOAD DATA LOCAL's file packets are relayed and recorded (one record per
read) once the policy allowed the statement. COM_CHANGE_USER is refused (a session has one identity: reconnect with
the other user's token), as are replication commands.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
from collections.abc import Iterator

from ingest.protocols.mysql import auth
from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.conversation import Conversation, command_name
from ingest.protocols.mysql.packets import COMMUNICATION_ERROR, Packet, PacketReader, make, packet, violation
from proxy.approvals import ApprovalRequest
from proxy.core import records
from proxy.core.commands import CLIENT, SERVER, OpenUpstream, Send, StartTLS, TLSFailed
from proxy.core.frontend import Ending, FrontEnd, Protocol, Said, Steps
from proxy.core.session import Session
from proxy.core.settings import is_loopback
from proxy.policy import Decision, Operation
from proxy.settings import ProxySettings

from .masking import RowMasking
from .redaction import MysqlRedactor
from .settings import MysqlSettings

log = logging.getLogger(__name__)

ER_ACCESS_DENIED = (1045, "28000")
ER_DBACCESS_DENIED = (1044, "42000")
ER_TABLEACCESS_DENIED = (1142, "42000")
ER_NOT_SUPPORTED = (1235, "42000")
ER_NET_ERROR = (1158, COMMUNICATION_ERROR)
ER_SERVER_SHUTDOWN = (1053, "08S01")
ER_CONNECTION_KILLED = (1927, "70100")
ER_UNKNOWN = (1105, "HY000")
ER_NO_SUCH_THREAD = (1094, "HY000")
_KILL = re.compile(r"\s*KILL\s+(?:(QUERY|CONNECTION)\s+)?(\d+)\s*;?\s*", re.IGNORECASE)
_ENDING_ERRORS = {"shutdown": ER_SERVER_SHUTDOWN, "recorder_failure": ER_SERVER_SHUTDOWN,
                  "upstream_unavailable": ER_UNKNOWN, "identity_expired": ER_CONNECTION_KILLED,
                  "protocol_error": ER_NET_ERROR, "policy": ER_DBACCESS_DENIED}
_REFUSED_COMMANDS = frozenset({"COM_CHANGE_USER", "COM_BINLOG_DUMP", "COM_BINLOG_DUMP_GTID", "COM_REGISTER_SLAVE",
                               "COM_TABLE_DUMP", "COM_CONNECT_OUT", "COM_DAEMON", "COM_STMT_BULK_EXECUTE",
                               "COM_CONNECT", "COM_TIME", "COM_DELAYED_INSERT", "COM_PROCESS_INFO"})
_ROWS = frozenset({"TextRow", "BinaryRow"})
_SECRET_COMMANDS = frozenset({"COM_CHANGE_USER"})  # recorded without their bytes: they carry a password (a token)
_ANALYZED = frozenset({"COM_QUERY", "COM_STMT_PREPARE", "COM_STMT_EXECUTE"})
PROXY_ORIGIN = records.PROXY_ORIGIN
_connection_ids = itertools.count(1)
UTF8MB4 = 45


def _databases_named(sql: str) -> tuple[list[str], list[str]]:
    """The databases `USE` switches to, and those that qualify table names, in a statement text.

    What does not parse is left to the policy's `on_parse_error`."""
    from proxy.policy.mysql_sql import analyze_mysql  # sqlglot: only where `databases` is set

    used: list[str] = []
    qualified: list[str] = []
    try:
        statements = [s for top in analyze_mysql(sql) for s in top.walk()]
    except Exception:  # noqa: BLE001 - unparseable: the policy decides (on_parse_error)
        return used, qualified
    for statement in statements:
        if statement.kind == "set" and statement.text.lstrip().lower().startswith("use") and statement.tables:
            used.append(statement.tables[0])
        else:
            qualified += [name.rsplit(".", 1)[0] for name in statement.tables if "." in name]
    return used, list(dict.fromkeys(qualified))


class MysqlProtocol(Protocol):
    name = "mysql"

    def __init__(self, settings: MysqlSettings) -> None:
        self.settings = settings
        self.listener = settings.listener
        self.upstream = settings.upstream.describe()
        self.sessions: dict[int, "MysqlFrontEnd"] = {}  # the connection ids this listener gave its clients

    @classmethod
    def from_settings(cls, proxy: ProxySettings, fail_open: bool) -> "MysqlProtocol":
        return cls(MysqlSettings.from_config(proxy, fail_open))

    def front_end(self, session: Session) -> "MysqlFrontEnd":
        return MysqlFrontEnd(session, self.settings, self.sessions)


def record(kind: str, data: bytes, fields: dict | None = None, origin: dict[str, str] | None = None) -> dict:
    """One packet (or a run of rows) as the contract's Message record."""
    out = {"type": kind, "data": data, "attributes": {}}
    if fields:
        attributes = fields.get("attributes")
        out.update({k: v for k, v in fields.items() if k != "attributes" and v is not None})
        if attributes:
            out["attributes"] = dict(attributes)
    if origin:
        out["attributes"].update(origin)
    return out


def _scramble() -> bytes:
    """20 bytes of the printable range (some clients treat the scramble as a C string)."""
    return bytes(0x21 + secrets.randbelow(0x7E - 0x21) for _ in range(20))


class MysqlFrontEnd(FrontEnd):
    def __init__(self, session: Session, settings: MysqlSettings,
                 sessions: dict[int, "MysqlFrontEnd"] | None = None) -> None:
        super().__init__(session)
        self.settings = settings
        self._sessions = sessions if sessions is not None else {}
        self.phase = "greeting"
        self._client = PacketReader("client", settings.max_packet)
        self._upstream = PacketReader("server", settings.max_packet)
        self._scramble = _scramble()
        self.connection_id = next(_connection_ids)
        self._sessions[self.connection_id] = self
        self._offered = m.RELAYED_CAPABILITIES | (m.CLIENT_SSL if session.settings.tls is not None else 0)
        self._response: m.HandshakeResponse | None = None
        self._token_kind = "AuthSwitchResponse"  # the record of the client's packet that carries the token
        self._capabilities = 0  # what the client and the proxy agreed
        self._seq = 0  # the next sequence id towards the client during login
        self.user: str | None = None
        self.database: str | None = settings.upstream.database
        self._server_handshake: m.Handshake | None = None
        self._upstream_seq = 0
        self._upstream_plugin = ""
        self._upstream_scramble = b""
        self._upstream_open = False
        self._conversation: Conversation | None = None
        self._masking: RowMasking | None = None
        self._early: list[Packet] = []
        self._early_server: list[Packet] = []
        self.redactor = MysqlRedactor(session, self)  # passwords, keys, detector findings: not kept in clear

    @property
    def conversation(self) -> Conversation | None:
        return self._conversation

    @property
    def is_idle(self) -> bool:
        return self._conversation is not None and self._conversation.idle

    # --- greeting and the client's login ----------------------------------------------------

    def started(self) -> Steps:
        greeting = m.Handshake(self.settings.server_version, self.connection_id, self._scramble, self._offered,
                               UTF8MB4, m.SERVER_STATUS_AUTOCOMMIT, auth.NATIVE)
        data = packet(0, m.handshake(greeting))
        self.phase = "login"
        self._seq = 1
        yield self.session.say(Said(data, [record("Handshake", data, {"attributes": {
            "server_version": greeting.server_version, "connection_id": str(self.connection_id),
            "auth_plugin": auth.NATIVE, "capabilities": f"0x{self._offered:08x}"}}, PROXY_ORIGIN)]))

    def _send_login(self, kind: str, payload: bytes, fields: dict | None = None) -> Send:
        data = packet(self._seq, payload)
        self._seq += 1
        return self.session.say(Said(data, [record(kind, data, fields, PROXY_ORIGIN)]))

    def client_data(self, data: bytes) -> Steps:
        if self.phase == "relay":
            yield from self._relay_client(data)
            return
        packets = self._client.feed(data)
        for i, p in enumerate(packets):
            if self.session.is_closed:
                return
            if self.phase == "login":
                if (yield from self._login(p, packets[i + 1:])):
                    return  # the rest of this read was the client's TLS handshake, handed to it
            elif self.phase == "token":
                yield from self._token(p)
            else:
                self._early.append(p)
                if sum(len(x.data) for x in self._early) > self.settings.max_packet:
                    raise violation("too much data sent before authentication completed")

    def client_closed(self) -> Steps:
        self._client.eof()
        yield from self.session.end("client_disconnect")

    def _expect_seq(self, p: Packet) -> None:
        if p.seq != self._seq:
            raise violation(f"client packet with sequence id {p.seq}, expected {self._seq}")
        self._seq = p.last_seq + 1

    def _login(self, p: Packet, following: list[Packet]) -> Steps:
        """The client's HandshakeResponse (or SSLRequest); True when the bytes that followed it in the same read
        (`following`, and what the reader holds) were taken as the start of TLS: a MySQL client sends its
        ClientHello right behind the SSLRequest, without waiting for an answer."""
        session = self.session
        self._expect_seq(p)
        response = m.decode_handshake_response(p.payload)
        if response.ssl_request:
            session.record_messages(CLIENT, [record("SSLRequest", p.data)], 1)
            if session.settings.tls is None or session.client_tls is not None:
                raise violation("SSLRequest, but TLS was not offered")
            early = b"".join([x.data for x in following]) + self._client.take_unread()
            yield StartTLS(CLIENT, session.settings.tls, early=early)
            return True
        if session.settings.tls is not None and session.client_tls is None and response.capabilities & m.CLIENT_SSL:
            raise violation("the client announced TLS but did not start it")
        self._response = response
        self.user = response.user
        self._capabilities = response.capabilities & self._offered
        attributes = {"user": response.user, "capabilities": f"0x{response.capabilities:08x}"}
        if response.database:
            attributes["database"] = response.database
        if response.auth_plugin:
            attributes["auth_plugin"] = response.auth_plugin
        session.record_messages(CLIENT, [record("HandshakeResponse", b"", {"attributes": {
            **attributes, "redacted": "token", **{f"attr.{k}": v for k, v in response.attributes.items()}}})], 1)
        session.client_application = response.attributes.get("program_name") or response.attributes.get("_client_name")
        session.attributes = {**attributes, **{k: v for k, v in response.attributes.items() if k not in attributes}}
        if self._capabilities & m.CLIENT_COMPRESS:
            yield from self._refuse_login("compression_refused", "the compressed protocol is not relayed",
                                          ER_NOT_SUPPORTED)
            return
        if not response.user:
            yield from self._refuse_login("missing_user", "no user name in the handshake", ER_ACCESS_DENIED)
            return
        if not self._may_take_clear_password():
            yield from self._refuse_login("tls_required", "the token is a password sent in clear: connect with TLS "
                                          "(or from this machine)", ER_ACCESS_DENIED)
            return
        if response.auth_plugin == auth.CLEAR:
            yield from self._verify(response.auth_response)
            return
        self.phase = "token"
        if response.auth_plugin == auth.CACHING_SHA2 and session.client_tls is not None:
            # caching_sha2_password's full authentication: the client sends its password (the token) in clear,
            # which it does only inside TLS; the proxy caches nothing, so there is no fast path to offer
            self._token_kind = "AuthFullResponse"
            yield self._send_login("AuthMoreData", b"\x01" + bytes((auth.FULL_AUTH,)),
                                   {"attributes": {"auth_plugin": auth.CACHING_SHA2, "full_authentication": "true"}})
            return
        yield self._send_login("AuthSwitchRequest", m.auth_switch_request(auth.CLEAR, b""),
                               {"attributes": {"auth_plugin": auth.CLEAR}})

    def _may_take_clear_password(self) -> bool:
        if self.session.client_tls is not None:
            return True
        host = self.session.source_address.rsplit(":", 1)[0]
        return is_loopback(host)

    def _token(self, p: Packet) -> Steps:
        self._expect_seq(p)
        self.session.record_messages(CLIENT, [record(self._token_kind, b"", {"attributes": {"redacted": "token"}})], 1)
        yield from self._verify(p.payload)

    def _refuse_login(self, reason_code: str, detail: str, error: tuple[int, str]) -> Steps:
        data = packet(self._seq, m.err(error[0], error[1], f"custody: {detail}"))
        said = Said(data, [record("ERR", data, {"error_code": error[1], "error_message": f"custody: {detail}",
                                                "attributes": {"errno": str(error[0])}}, PROXY_ORIGIN)])
        yield from self.session.deny(reason_code, detail, said=said)

    def _verify(self, secret: bytes) -> Steps:
        session = self.session
        token = secret.rstrip(b"\x00").decode("utf-8", "replace")
        self.phase = "verifying"
        identity = yield from session.authenticate(token, self.user, start=False)
        if identity is None:
            return
        database = self._choose_database()
        if database is False:
            yield from self._refuse_database(self._response.database if self._response else "")
            return
        self.database = database or None
        session.upstream = self.settings.upstream.describe(self.database)
        self.phase = "opening"  # the target's greeting may come before OpenUpstream completes: it waits
        upstream = self.settings.upstream
        yield OpenUpstream(upstream.host, upstream.port)
        self._upstream_open = True
        self.phase = "connecting"
        waiting, self._early_server = self._early_server, []
        for p in waiting:
            if session.is_closed:
                return
            yield from self._login_packet(p)

    def _choose_database(self) -> str | None | bool:
        """The schema to log in to: the configured one, or one of `databases` the client named; False: refused."""
        default, allowed = self.settings.upstream.database, self.settings.databases
        asked = (self._response.database if self._response else None) or ""
        if not allowed or asked in ("", default):
            return default
        return asked if asked in allowed else False

    def _allowed_database(self, name: str) -> bool:
        allowed = self.settings.databases
        return not allowed or name == self.settings.upstream.database or name in allowed

    def _refuse_database(self, asked: str | None) -> Steps:
        session = self.session
        choices = ", ".join(x for x in dict.fromkeys((self.settings.upstream.database or "", *self.settings.databases)) if x)
        detail = f"database '{asked}' is not served by target {self.settings.name!r} (choose one of: {choices})"
        session.open(session.identity)
        session.record("policy_decision", records.decision("databases", "deny", detail, None,
                                                           attributes={"database": asked or ""}))
        data = packet(self._seq, m.err(*ER_DBACCESS_DENIED, f"custody: {detail}"))
        said = Said(data, [record("ERR", data, {"error_code": ER_DBACCESS_DENIED[1], "error_message": detail},
                                  PROXY_ORIGIN)])
        yield from session.end_with(Ending("policy", "database_refused", detail), said)

    # --- the proxy's own login to the target -------------------------------------------------

    def server_data(self, data: bytes) -> Steps:
        if self.phase == "relay":
            yield from self._relay_server(data)
            return
        for p in self._upstream.feed(data):
            if self.session.is_closed:
                return
            if self.phase == "opening":
                self._early_server.append(p)
            else:
                yield from self._login_packet(p)

    def _login_packet(self, p: Packet) -> Steps:
        if self.phase == "connecting":
            yield from self._upstream_handshake(p)
        elif self.phase == "upstream_auth":
            yield from self._upstream_auth(p)
        else:
            raise violation(f"unexpected packet from the target during {self.phase}")

    def server_closed(self) -> Steps:
        if self.phase != "relay":
            yield from self.session.upstream_unavailable("the target closed the connection during login")
            return
        self._upstream.eof()
        yield from self.session.end("server_disconnect")

    def _upstream_handshake(self, p: Packet) -> Steps:
        session = self.session
        try:
            h = m.decode_handshake(p.payload)
        except Exception as error:  # noqa: BLE001 - the target's refusal (too many connections...) or garbage
            yield from session.upstream_unavailable(str(getattr(error, "message", error)))
            return
        self._server_handshake = h
        needed = m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_PLUGIN_AUTH
        if h.capabilities & needed != needed:
            yield from session.upstream_unavailable(f"the target {h.server_version} lacks the 4.1 protocol with "
                                                    "pluggable authentication")
            return
        if self._capabilities & m.CLIENT_DEPRECATE_EOF and not h.capabilities & m.CLIENT_DEPRECATE_EOF:
            self._capabilities &= ~m.CLIENT_DEPRECATE_EOF  # never agreed with the client: see _greet_client
        session.attributes["upstream_server_version"] = h.server_version
        session.attributes["upstream_connection_id"] = str(h.connection_id)
        self._upstream_scramble, self._upstream_plugin = h.scramble, h.auth_plugin or auth.NATIVE
        self._upstream_seq = p.seq + 1
        caps = self._upstream_capabilities(h)
        tls = self.settings.upstream_tls
        charset = self._response.charset if self._response else UTF8MB4
        if tls.enabled:
            if not h.capabilities & m.CLIENT_SSL:
                yield from session.upstream_unavailable(
                    f'the target does not offer TLS, and upstream_tls = "{tls.mode}" requires it')
                return
            yield Send(SERVER, packet(self._upstream_seq, m.ssl_request(caps | m.CLIENT_SSL, 1 << 24, charset)))
            self._upstream_seq += 1
            try:
                yield StartTLS(SERVER, tls.context, tls.server_hostname)
            except TLSFailed as error:
                yield from session.upstream_unavailable(f'TLS with the target failed (upstream_tls = "{tls.mode}"): {error}')
                return
            caps |= m.CLIENT_SSL
        session.open(session.identity)
        upstream = self.settings.upstream
        answer = auth.first_response(self._upstream_plugin, upstream.password, h.scramble, tls.enabled)
        plugin = self._upstream_plugin
        if answer is None:  # a plugin the proxy does not speak first: offer native, the target may switch
            plugin, answer = auth.NATIVE, auth.native_password(upstream.password, h.scramble)
        attributes = {"_client_name": "custody", "custody_session": session.session_id}
        if self._response is not None and "program_name" in self._response.attributes:
            attributes["program_name"] = self._response.attributes["program_name"]
        self.phase = "upstream_auth"
        yield Send(SERVER, packet(self._upstream_seq, m.handshake_response(
            caps, 1 << 24, charset, upstream.user, answer, self.database, plugin,
            attributes if caps & m.CLIENT_CONNECT_ATTRS else None)))
        self._upstream_seq += 1

    def _upstream_capabilities(self, h: m.Handshake) -> int:
        base = m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_PLUGIN_AUTH | m.CLIENT_LONG_PASSWORD
        return (self._capabilities | base) & m.RELAYED_CAPABILITIES & h.capabilities

    def _upstream_auth(self, p: Packet) -> Steps:
        if p.seq != self._upstream_seq & 0xFF:
            raise violation(f"the target's login packet has sequence id {p.seq}, expected {self._upstream_seq & 0xFF}")
        self._upstream_seq = p.last_seq + 1
        payload = p.payload
        upstream, tls = self.settings.upstream, self.settings.upstream_tls.enabled
        head = payload[:1]
        if head == b"\x00":
            yield from self._logged_in()
        elif head == b"\xff":
            error = m.decode_err(payload)
            log.warning("session %s: the target refused the proxy's login: %s %s", self.session.session_id,
                        error.code, error.message)
            yield from self.session.upstream_unavailable(f"the target refused the proxy's login ({error.code} "
                                                         f"{error.sqlstate})")
        elif head == b"\xfe":
            switch = m.decode_auth_switch(payload)
            answer = auth.first_response(switch.plugin, upstream.password, switch.data, tls)
            if answer is None:
                yield from self.session.upstream_unavailable(
                    f"the target asks for {switch.plugin}, which the proxy does not speak here")
                return
            self._upstream_plugin, self._upstream_scramble = switch.plugin, switch.data
            yield self._send_upstream(answer)
        elif head == b"\x01":  # AuthMoreData
            more = payload[1:]
            if self._upstream_plugin == auth.CACHING_SHA2 and more[:1] == bytes((auth.FAST_AUTH_OK,)):
                return  # the OK follows
            if self._upstream_plugin == auth.CACHING_SHA2 and more[:1] == bytes((auth.FULL_AUTH,)):
                if tls:
                    yield self._send_upstream(upstream.password.encode() + b"\x00")
                else:
                    yield self._send_upstream(auth.REQUEST_PUBLIC_KEY)
                return
            if self._upstream_plugin == auth.CACHING_SHA2 and more.startswith(b"-----BEGIN"):
                yield self._send_upstream(auth.caching_sha2_rsa(upstream.password, self._upstream_scramble, more))
                return
            raise violation("unexpected AuthMoreData from the target")
        else:
            raise violation("unexpected packet from the target during login")

    def _send_upstream(self, payload: bytes) -> Send:
        data = packet(self._upstream_seq, payload)
        self._upstream_seq += 1
        return Send(SERVER, data)

    def _logged_in(self) -> Steps:
        """The target accepted the proxy: the client gets its OK, and the relay begins."""
        session = self.session
        self._conversation = Conversation(self._capabilities)
        if session.gate is not None:
            self._masking = RowMasking(session.gate)
        yield self._send_login("OK", m.ok(), {"command_tag": "OK", "attributes": {"database": self.database or ""}})
        yield session.ready()
        self.phase = "relay"
        early, self._early = self._early, []
        for p in early:
            yield from self._command(p)
            if session.is_closed:
                return
        if self.is_idle:
            yield from session.between_operations()

    # --- relay: client commands --------------------------------------------------------------

    def _relay_client(self, data: bytes) -> Steps:
        conversation = self._conversation
        assert conversation is not None
        file: list[bytes] = []  # LOAD DATA LOCAL: the file's packets of this read, one record
        for p in self._client.feed(data):
            if conversation.receiving_file:
                kind, fields = conversation.file_data(p)
                if kind == "LocalInfileData":
                    file.append(p.data)
                    continue
                yield from self._file_packets(file, p.data, record(kind, p.data, fields))
                file = []
                continue
            yield from self._command(p)
            if self.session.is_closed:
                return
        yield from self._file_packets(file)

    def _file_packets(self, packets: list[bytes], end: bytes = b"", end_record: dict | None = None) -> Iterator[Send]:
        """A read's packets of a LOCAL INFILE (and its end), recorded as one run, relayed as they came."""
        recs = [record("LocalInfileData", b"".join(packets), {"attributes": {"messages": str(len(packets))}}
                       if len(packets) > 1 else None)] if packets else []
        if end_record is not None:
            recs.append(end_record)
        if recs:
            self.session.record_messages(CLIENT, recs, len(packets) + (end_record is not None))
            yield Send(SERVER, b"".join(packets) + end)

    def _command(self, p: Packet) -> Steps:
        session, conversation = self.session, self._conversation
        assert conversation is not None
        kind, fields = conversation.client(p)
        objects = self._objects(kind, fields)
        if objects:
            fields["objects"] = list(objects)
        kill = self._kill(kind, p, fields)
        session.record_messages(CLIENT, [record(kind, b"" if kind in _SECRET_COMMANDS else p.data, fields)], 1)
        if isinstance(kill, str):
            yield from self._answer(p, ER_NO_SUCH_THREAD, kill)
            return
        if kind == "COM_QUIT":
            yield Send(SERVER, p.data)
            yield from session.end("client_terminate")
            return
        if kind in _REFUSED_COMMANDS or kind.startswith("COM_0x"):
            why = ("a session has one identity: reconnect with the other user's token" if kind == "COM_CHANGE_USER"
                   else "it is not relayed")
            yield from self._answer(p, ER_NOT_SUPPORTED, f"custody: {kind} is refused: {why}")
            return
        if kind == "COM_INIT_DB":
            name = fields["attributes"]["database"]
            if not self._allowed_database(name):
                detail = f"database '{name}' is not served by target {self.settings.name!r}"
                session.record("policy_decision", records.decision("databases", "deny", detail, fields.get("text"),
                                                                   attributes={"database": name}))
                yield from self._answer(p, ER_DBACCESS_DENIED, f"custody: {detail}")
                return
        text = fields.get("text")
        used: list[str] = []
        if text is not None and kind in ("COM_QUERY", "COM_STMT_PREPARE") and self.settings.databases:
            used, foreign = _databases_named(text)
            refused = next((name for name in (*used, *foreign) if not self._allowed_database(name)), None)
            if refused is not None:
                detail = f"database '{refused}' is not served by target {self.settings.name!r}"
                session.record("policy_decision", records.decision("databases", "deny", detail, text,
                                                                   attributes={"database": refused}))
                yield from self._answer(p, ER_DBACCESS_DENIED, f"custody: {detail}")
                return
        if text is not None and kind in ("COM_QUERY", "COM_STMT_PREPARE", "COM_INIT_DB") and session.gate is not None:
            attributes = {"database": self.database or ""}
            if kind == "COM_STMT_PREPARE":
                attributes["prepared"] = "true"
            verdict = yield from session.check(Operation("mysql", "statement", text, objects, attributes))
            if not verdict.allowed:
                yield from self._answer(p, ER_TABLEACCESS_DENIED, f"custody: {verdict.reason}")
                return
        if kind == "COM_INIT_DB":
            self.database = fields["attributes"]["database"]
        elif used and kind == "COM_QUERY":
            self.database = used[-1]  # what later statements' attributes.database say
        if isinstance(kill, Packet):
            p = kill  # the proxy's connection id, as the target knows that session
        conversation.sent(p)
        yield Send(SERVER, p.data)

    def _objects(self, kind: str, fields: dict) -> tuple[str, ...]:
        """The tables a statement names (its record's and its operation's `objects`), from sqlglot's analysis.

        Only where the statement is analyzed anyway (a policy, or `databases`), from the analysis cache
        the policy then reads too; a session under no policy pays no parse (a few hundred microseconds per
        new text) for its evidence."""
        text = fields.get("text")
        if text is None or kind not in _ANALYZED or (self.session.gate is None and not self.settings.databases):
            return ()
        from proxy.policy.mysql_sql import tables_of  # sqlglot: only where statements are analyzed

        return tables_of(text)

    def _kill(self, kind: str, p: Packet, fields: dict) -> Packet | str | None:
        """KILL [QUERY] <id> / COM_PROCESS_KILL with the id the client was given: the command with the target's id.

        Only this listener's sessions of the same identity can be named; a refusal is the error's text."""
        if kind == "COM_QUERY":
            match = _KILL.fullmatch(fields.get("text") or "")
            if match is None:
                return None
            which, number = (match.group(1) or "").upper(), int(match.group(2))
        elif kind == "COM_PROCESS_KILL" and len(p.payload) >= 5:
            which, number = "", int.from_bytes(p.payload[1:5], "little")
        else:
            return None
        other = self._sessions.get(number)
        mine = self.session.identity
        theirs = other.session.identity if other is not None else None
        handshake = other._server_handshake if other is not None else None
        if (handshake is None or other is None or other.phase != "relay" or mine is None or theirs is None
                or theirs.subject != mine.subject):
            return f"Unknown thread id: {number}"
        fields.setdefault("attributes", {}).update({"kill_session": other.session.session_id})
        if kind == "COM_QUERY":
            return make(0, b"\x03" + f"KILL {which + ' ' if which else ''}{handshake.connection_id}".encode())
        return make(0, b"\x0c" + handshake.connection_id.to_bytes(4, "little"))

    def _answer(self, p: Packet, error: tuple[int, str], message: str) -> Iterator[Send]:
        """The proxy answers a command itself (ERR), in the command's turn."""
        data = packet(p.last_seq + 1, m.err(error[0], error[1], message))
        assert self._conversation is not None
        if self._conversation.answer_by_proxy(data):
            yield self._say_err(data, error, message)

    def _say_err(self, data: bytes, error: tuple[int, str], message: str) -> Send:
        return self.session.say(Said(data, [record("ERR", data, {
            "error_code": error[1], "error_message": message, "attributes": {"errno": str(error[0])},
            "outcome": "error"}, PROXY_ORIGIN)]))

    # --- relay: the target's answers ---------------------------------------------------------

    def _relay_server(self, data: bytes) -> Steps:
        conversation = self._conversation
        assert conversation is not None
        packets = self._upstream.feed(data)
        if not packets:
            return
        recs: list[dict] = []
        out: list[bytes] = []
        count = 0
        run: list[bytes] = []  # rows of one kind, as relayed
        originals: list[bytes] = []  # the same rows as the target sent them
        run_kind = ""
        changed = False
        masking = self._masking
        if masking is not None:
            masking.refresh()

        def flush_run() -> None:
            nonlocal run, originals, run_kind, changed
            if run:
                rec = record(run_kind, b"".join(run), {"attributes": {"messages": str(len(run))}} if len(run) > 1 else None)
                if changed:
                    assert masking is not None
                    rec["sealed_original"] = masking.seal(b"".join(originals))
                recs.append(rec)
            run, originals, run_kind, changed = [], [], "", False

        for p in packets:
            columns = conversation.columns
            binary = conversation.binary
            swallowed = conversation.swallowing
            kind, fields = conversation.server(p)
            wire = p.data
            count += 1
            if kind in _ROWS:
                if kind != run_kind:
                    flush_run()
                    run_kind = kind
                if masking is not None:
                    masked = masking.row(p, columns, binary)
                    if masked is not None:
                        changed, wire = True, masked
                run.append(wire)
                originals.append(p.data)
                out.append(wire)
                continue
            flush_run()
            if kind == "PrepareOK" and fields.get("statement"):  # it repeats the prepared SQL: as redacted
                fields["statement"] = self.redactor.shown(fields["statement"])
            sealed = None
            if kind == "ERR" and masking is not None:
                shown = masking.error(p)
                if shown is not None:
                    sealed, wire = wire, shown
                    fields["error_message"] = m.decode_err(shown[4:]).message
            rec = record(kind, wire, fields)
            if sealed is not None:
                assert masking is not None
                rec["sealed_original"] = masking.seal(sealed)
            recs.append(rec)
            if kind == "LocalInfileRequest" and self.session.gate is not None:
                self.session.record_messages(SERVER, recs, count)
                if out:
                    yield Send(CLIENT, b"".join(out))
                recs, out, count = [], [], 0
                yield from self._file_requested(fields, wire)
                continue
            if swallowed:  # the target's answer to an empty file the proxy sent for a refused one
                rec["attributes"]["unrelayed"] = "the proxy refused the file and answered the client"
            else:
                out.append(wire)
            due = conversation.due_answers()
            if due:
                self.redactor.echoed(recs, self.session.seal)
                self.session.record_messages(SERVER, recs, count)
                if out:
                    yield Send(CLIENT, b"".join(out))
                recs, out, count = [], [], 0
                for answer in due:
                    err = m.decode_err(answer[4:])
                    yield self._say_err(answer, (err.code, err.sqlstate), err.message)
        flush_run()
        if recs:
            self.redactor.echoed(recs, self.session.seal)
            self.session.record_messages(SERVER, recs, count)
        if out:
            yield Send(CLIENT, b"".join(out))
        if conversation.idle:
            yield from self.session.between_operations()

    def _file_requested(self, fields: dict, request: bytes) -> Steps:
        """The target asks for the client's LOCAL INFILE: a `transfer` operation the policy decides first.

        Allowed: the request goes on to the client. Refused: the client is never asked; the target gets an
        empty file (its answer is recorded, not relayed) and the client ERR 1142 in the request's place."""
        conversation = self._conversation
        assert conversation is not None
        name = fields["text"]
        verdict = yield from self.session.check(Operation("mysql", "transfer", name, (name,), {
            "database": self.database or "", "direction": "upload"}))
        if verdict.allowed:
            yield Send(CLIENT, request)
            return
        empty, seq = conversation.refuse_file()
        self.session.record_messages(CLIENT, [record("LocalInfileEnd", empty, {"attributes": {
            "bytes": "0", "refused": "true"}}, PROXY_ORIGIN)], 1)
        yield Send(SERVER, empty)
        message = f"custody: {verdict.reason}"
        yield self._say_err(packet(seq, m.err(*ER_TABLEACCESS_DENIED, message)), ER_TABLEACCESS_DENIED, message)

    # --- what only MySQL can say -------------------------------------------------------------

    def _goodbye_seq(self) -> int:
        if self.phase != "relay":
            return self._seq
        conversation = self._conversation
        if conversation is not None and conversation.expected and conversation.expected[0].kind != "proxy":
            return conversation.expected[0].seq
        return 1

    def goodbye(self, ending: Ending) -> Said:
        if ending.reason == "auth_failed":
            error, text = ER_ACCESS_DENIED, f"Access denied for user '{self.user}' (custody: {ending.code})"
        else:
            error, text = _ENDING_ERRORS.get(ending.reason, ER_SERVER_SHUTDOWN), f"custody: {ending.text}"
        data = packet(self._goodbye_seq(), m.err(error[0], error[1], text))
        return Said(data, [record("ERR", data, {"error_code": error[1], "error_message": text,
                                                "attributes": {"errno": str(error[0])}, "outcome": "error"},
                                  PROXY_ORIGIN)])

    def farewell_upstream(self, reason: str) -> bytes | None:
        if self._upstream_open and self.phase == "relay" and reason not in ("server_disconnect", "client_terminate"):
            return packet(0, b"\x01")  # COM_QUIT
        return None

    def closed(self) -> None:
        if self._sessions.get(self.connection_id) is self:
            del self._sessions[self.connection_id]

    def hold_notice(self, request: ApprovalRequest, decision: Decision) -> Said | None:
        """MySQL has no asynchronous notices: the client just waits; reviewers see the request."""
        log.info("session %s: %s waits for approval, request %s", self.session.session_id, decision.message,
                 request.request_id)
        return None


__all__ = ["MysqlFrontEnd", "MysqlProtocol", "command_name", "json"]

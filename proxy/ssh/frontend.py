"""The SSH front end: its protocol state machine on the proxy core.

asyncssh terminates SSH on both sides (`proxy.ssh.server` is the glue); what
reaches this module are SSH's events (`proxy.ssh.events`) in the order they
happened, through the core's lanes (`Session.event`). Phases: startup → the
client's password or keyboard-interactive answer is its OIDC token for the
SSH user = the token's username claim (`session.authenticate`) → connecting
(the proxy logs in to the target with its own credential, the target's host
key pinned) → relay.

Recorded: every channel's requests, data, EOF and close both ways with the
channel id (`Message.channel`); pty-req and window-change sizes, env, exec
command lines (operation `command`), exit status (outcome); SFTP decoded per
packet (`ingest.protocols.ssh.sftp`), with the file bytes in the packets'
data and each closed file's size and SHA-256; forwarded connections
(operation `forward`).

Policy: an exec or shell request is an operation (`ssh`, `command`, the
command line; the analyzer `proxy.policy.analyzers.ssh` reads it with shell
quoting rules); SFTP open (upload/download), remove, rename, mkdir, rmdir,
setstat and symlink are `transfer` operations on their paths; a direct-tcpip
channel (`ssh -L`/`-W`) is a `forward` to host:port and a tcpip-forward
request (`ssh -R`) a `forward` "remote host:port" of the target's listen
address, and agent forwarding (`ssh -A`) a `forward` "agent" (attribute
direction local/remote/agent), each refused unless a rule allows it; an
allowed remote forwarding's connections and agent's channels are relayed to
the client and recorded like direct-tcpip's. X11 is always refused. In an
interactive shell with a PTY each line typed is a `command` operation too,
decided at its Enter (best effort: `ingest.protocols.ssh.terminal` rebuilds
the line; a refused line is wiped from the target's line editor). A
blocked exec gets the reason on stderr and exit status 126; a refused SFTP
request gets SSH_FX_PERMISSION_DENIED and the session goes on; a hold waits
for the reviewers (the client sees a notice on stderr).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Generator

from datetime import datetime, timezone

from ingest.protocols import ProtocolViolation
from ingest.protocols.ssh import sftp, terminal
from proxy.approvals import ApprovalRequest
from proxy.core import records
from proxy.core.commands import CLIENT, SERVER, Send
from proxy.core.frontend import Ending, FrontEnd, Protocol, Said, Steps
from proxy.core.session import Session
from proxy.policy import Decision
from proxy.policy.analyzers import shell_objects
from proxy.policy.operation import AnalysisError, Operation
from proxy.settings import ProxySettings

from . import authorized_keys, certificates
from . import events as ev
from .masking import mask_terminal
from .settings import SSHSettings

log = logging.getLogger(__name__)

BLOCKED_STATUS = 126  # "command found but not executable", as a shell says of a command it may not run
FAILED_STATUS = 1
FORWARD_CLOSED_RULE = "forwarding-closed-by-default"
# What wipes a refused typed line from the target's line editor: ^E (readline, zle: to the end; the tty's
# canonical mode: a character) and ^U (kill the line), then Enter on the empty line for a fresh prompt.
WIPE_LINE = b"\x05\x15\r"


class SSHProtocol(Protocol):
    """One SSH listener: its settings (the target, the proxy's credential and host keys)."""

    name = "ssh"

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings
        self.listener = settings.listener
        self.upstream = settings.upstream.describe()

    @classmethod
    def from_settings(cls, proxy: ProxySettings, fail_open: bool) -> "SSHProtocol":
        return cls(SSHSettings.from_config(proxy, fail_open))

    def front_end(self, session: Session) -> "SSHFrontEnd":
        return SSHFrontEnd(session, self.settings)

    def make_listener(self, verifier, recorder, policy, approvals, identity_leeway):
        """asyncssh owns its sockets: the SSH glue, not the byte adapter."""
        from .server import SSHListener

        return SSHListener(self, verifier, recorder, policy, approvals, identity_leeway)


def message(kind: str, channel: int | None, data: bytes = b"", attributes: dict[str, str] | None = None,
            **fields: Any) -> records.Record:
    """One `Message` record of an SSH session; `channel` is the proxy's id of the client's channel."""
    record: records.Record = {"type": kind, "data": data, "attributes": attributes or {},
                              "channel": None if channel is None else str(channel)}
    record.update(fields)
    return record


def _size_attributes(size: tuple[int, int, int, int]) -> dict[str, str]:
    return {"columns": str(size[0]), "rows": str(size[1]), "width_px": str(size[2]), "height_px": str(size[3])}


@dataclass
class _Channel:
    id: int
    kind: str  # exec | shell | subsystem | forward
    text: str = ""
    open: bool = False  # the target's side is open
    reader: sftp.PacketReader | None = None  # SFTP: the client's packets
    replies: sftp.PacketReader | None = None  # SFTP: the target's packets
    transfers: sftp.Transfers | None = None
    operations: dict[int, str] = field(default_factory=dict)  # SFTP request id -> operation, for its outcome
    closing: dict[int, bytes] = field(default_factory=dict)  # SFTP close request id -> handle
    terminal: bool = False  # exec or shell with a PTY: output for a person's eyes, masked under a [[mask]] plan
    lines: terminal.LineEditor | None = None  # a shell with a PTY: the line being typed, decided at each Enter
    request: bytearray | None = None  # the certificate subsystem: the public key line, until the client's EOF
    exit: ev.Exit | None = None  # the target's exit status, relayed when its channel closes (output may follow it)
    client_bytes: int = 0  # channel data from the client (a forward's close records both counts)
    server_bytes: int = 0


class SSHFrontEnd(FrontEnd):
    def __init__(self, session: Session, settings: SSHSettings) -> None:
        super().__init__(session)
        self.settings = settings
        self.phase = "startup"
        self.user: str | None = None
        self.channels: dict[int, _Channel] = {}
        self._notice_channel: int | None = None  # where a hold notice goes
        self.key_mapped = False  # logged in with a public key mapped in the config, not a token or certificate

    @property
    def is_idle(self) -> bool:
        """No channel open: an expired identity may end the session now."""
        return not self.channels

    # --- events ------------------------------------------------------------------------------

    def client_event(self, item: Any) -> Steps:
        kind = type(item)
        if kind is ev.ChannelData:
            yield from self._client_data(item)
        elif kind is ev.Login:
            yield from self._login(item)
        elif kind is ev.ChannelStart:
            yield from self._start(item)
        elif kind is ev.WindowChange:
            self._record(CLIENT, message("window-change", item.channel, attributes=_size_attributes(item.size)))
            if self._open(item.channel):
                yield ev.Resize(item.channel, item.size)
        elif kind is ev.Signal:
            self._record(CLIENT, message("signal", item.channel, attributes={"signal": item.name}))
            if self._open(item.channel):
                yield ev.SendSignal(item.channel, item.name)
        elif kind is ev.Break:
            self._record(CLIENT, message("break", item.channel, attributes={"msec": str(item.msec)}))
            if self._open(item.channel):
                yield ev.SendBreak(item.channel, item.msec)
        elif kind is ev.ChannelEof:
            self._record(CLIENT, message("eof", item.channel))
            if self._open(item.channel):
                yield ev.SendEof(SERVER, item.channel)
            elif item.channel in self.channels and self.channels[item.channel].request is not None:
                yield from self._certificate(self.channels[item.channel])
        elif kind is ev.ChannelClosed:
            yield from self._closed(CLIENT, item.channel)
        elif kind is ev.ForwardOpen:
            yield from self._forward(item)
        elif kind is ev.ForwardRequest and item.kind == "remote":
            yield from self._remote_forward(item)
        elif kind is ev.ForwardRequest and item.kind == "agent":
            yield from self._agent_forward(item)
        elif kind is ev.ForwardRequest:
            self._refused_request(item)
        else:
            raise TypeError(f"unknown SSH client event {item!r}")

    def server_event(self, item: Any) -> Steps:
        kind = type(item)
        if kind is ev.ForwardedOpen:
            yield from self._forwarded(item)
            return
        channel = self.channels.get(getattr(item, "channel", -1))
        if channel is None:
            return  # the client's side already went: nothing to relay (asyncssh reports late events)
        if kind is ev.ChannelData:
            yield from self._server_data(channel, item)
        elif kind is ev.ExitStatus:
            failed = item.status != 0
            self._record(SERVER, message("exit-status", item.channel, attributes={"status": str(item.status)},
                                         outcome="error" if failed else "ok",
                                         error_code=str(item.status) if failed else None))
            channel.exit = ev.Exit(item.channel, status=item.status)
        elif kind is ev.ExitSignal:
            self._record(SERVER, message("exit-signal", item.channel, outcome="error", error_code=item.signal,
                                         error_message=item.message or None,
                                         attributes={"signal": item.signal, "core_dumped": str(item.core_dumped).lower()}))
            channel.exit = ev.Exit(item.channel, signal=item.signal, core_dumped=item.core_dumped, message=item.message)
        elif kind is ev.ChannelEof:
            self._record(SERVER, message("eof", item.channel))
            yield ev.SendEof(CLIENT, item.channel)
        elif kind is ev.ChannelClosed:
            yield from self._closed(SERVER, item.channel)
        else:
            raise TypeError(f"unknown SSH server event {item!r}")

    def server_closed(self) -> Steps:
        if self.phase != "relay":
            yield from self.session.upstream_unavailable("the target closed the connection during login")
            return
        yield from self.session.end("server_disconnect")

    # --- login ----------------------------------------------------------------------------------

    def _login(self, login: ev.Login) -> Steps:
        session = self.session
        if self.phase != "startup":
            raise ProtocolViolation("ssh_auth", "a second authentication attempt after the first was decided")
        self.user = login.user
        session.client_application = login.client_version
        session.attributes = {"user": login.user, "auth_method": login.method, **login.attributes}
        # The token is the password: never recorded.
        self._record(CLIENT, message("userauth-request", None, attributes={
            "user": login.user, "method": login.method,
            **(login.attributes if login.method == "publickey" else {"redacted": "token"})}))
        self.phase = "verifying"
        if login.method == "publickey":  # a CA certificate or a mapped key: the glue checked it, it has the identity
            if isinstance(login.identity, certificates.CertificateRefused):
                yield from session.deny(login.identity.code, login.identity.detail, login.attributes)
                return
            identity = yield from session.bind_identity(login.identity, login.user, start=False)
            # A mapped key is revoked by removing its entry: no `custody ssh-login` certificate may outlive it.
            self.key_mapped = identity is not None and identity.issuer == authorized_keys.ISSUER
        else:
            identity = yield from session.authenticate(login.token, login.user, start=False)
        if identity is None:
            return  # refused and ended; the glue answers the attempt when it closes
        self.phase = "connecting"
        try:
            fingerprint = yield ev.ConnectTarget()
        except ev.HostKeyRefused as refused:
            # Nobody can tell a changed key from an impostor in the path: a protocol error (a violation).
            session.record("protocol_error", records.protocol_error("host_key_not_verified", refused.detail, b""))
            yield from session.upstream_unavailable(refused.detail)
            return
        session.attributes["upstream_host_key"] = str(fingerprint)
        session.open(identity)
        yield ev.LoginResult(True)
        yield session.ready()
        self.phase = "relay"

    # --- channels ---------------------------------------------------------------------------------

    def _record(self, direction: str, record: records.Record, count: int = 1) -> None:
        self.session.record_messages(direction, [record], count)

    def _open(self, channel_id: int) -> bool:
        channel = self.channels.get(channel_id)
        return channel is not None and channel.open

    def _attributes(self, **more: str) -> dict[str, str]:
        return {"user": self.user or "", "target_user": self.settings.upstream.user, **more}

    def _start(self, start: ev.ChannelStart) -> Steps:
        ch = start.channel
        channel = self.channels[ch] = _Channel(ch, start.kind)
        self._record(CLIENT, message("channel-open", ch, attributes={"type": "session"}))
        if start.term is not None:
            self._record(CLIENT, message("pty-req", ch, attributes={
                "term": start.term, **_size_attributes(start.size or (0, 0, 0, 0)), "modes": str(len(start.modes))}))
        for name, value in start.env.items():
            self._record(CLIENT, message("env", ch, attributes={"name": name, "value": value}))
        if start.kind == "subsystem":
            name = start.subsystem or ""
            self._record(CLIENT, message("subsystem", ch, attributes={"subsystem": name}))
            if name == certificates.CERT_SUBSYSTEM:  # `custody ssh-login`: answered here, never relayed
                channel.kind = "certificate"
                if self.settings.user_ca is None:
                    yield from self._refuse_channel(ch, "custody: this proxy issues no SSH certificates "
                                                        "(no user_ca_key_file)", FAILED_STATUS)
                elif self.key_mapped:
                    yield from self._refuse_channel(ch, "custody: no certificate for a login with a key mapped in the "
                                                        "config (removing its entry revokes it; a certificate would "
                                                        "outlive that)", FAILED_STATUS)
                else:
                    channel.request = bytearray()
                return
            if name == "sftp":
                channel.reader = sftp.PacketReader(self.settings.max_sftp_packet)
                channel.replies = sftp.PacketReader(max(self.settings.max_sftp_packet, 1 << 20) + 1024)
                channel.transfers = sftp.Transfers()
        else:
            text = start.command if start.kind == "exec" else "shell"
            channel.text = text or ""
            attributes = self._attributes(request=start.kind, **({"term": start.term} if start.term else {}))
            objects = _objects(text or "") if start.kind == "exec" else ()
            kind, scp = "command", _legacy_scp(text or "") if start.kind == "exec" else None
            if scp is not None:  # `scp -O`: the file bytes are this channel's data
                kind, objects = "transfer", scp[1]
                attributes.update(subsystem="scp", direction=scp[0])
            self._record(CLIENT, message(start.kind, ch, (text or "").encode() if start.kind == "exec" else b"",
                                         attributes={"request": start.kind}, operation=kind,
                                         text=text, objects=list(objects)))
            self._notice_channel = ch
            verdict = yield from self.session.check(Operation("ssh", kind, text or "", objects, attributes))
            self._notice_channel = None
            if not verdict.allowed:
                yield from self._refuse_channel(ch, f"custody: {verdict.reason}", BLOCKED_STATUS)
                return
        try:
            yield ev.OpenChannel(start)
        except ev.ChannelRefused as refused:
            yield from self._refuse_channel(ch, f"custody: the target refused the channel: {refused}", FAILED_STATUS)
            return
        if ch in self.channels:
            channel.open = True
            channel.terminal = start.term is not None and start.kind in ("shell", "exec")
            if start.kind == "shell" and start.term is not None:
                channel.lines = terminal.LineEditor()

    def _refuse_channel(self, ch: int, text: str, status: int) -> Steps:
        """The proxy's own stderr line and exit status for a request that does not run."""
        yield self.session.say(Said((text + "\r\n").encode(), [
            message("data", ch, (text + "\r\n").encode(), {"stream": "stderr", **records.PROXY_ORIGIN})],
            channel=ev.channel_name(ch, stderr=True)))
        self._record(SERVER, message("exit-status", ch, attributes={"status": str(status), **records.PROXY_ORIGIN},
                                     outcome="error", error_code=str(status), error_message=text))
        yield ev.Exit(ch, status=status)

    def _closed(self, side: str, ch: int) -> Steps:
        channel = self.channels.pop(ch, None)
        if channel is None:
            return
        totals = None
        if channel.kind == "forward":  # what went through the forwarded connection, each way
            totals = {"destination": channel.text, "client_bytes": str(channel.client_bytes),
                      "server_bytes": str(channel.server_bytes)}
        self._record(side, message("close", ch, attributes=totals))
        if side == SERVER and channel.exit is not None:
            # sshd may send the exit status before the last of the output; relaying the exit
            # closes the client's channel, so it waits for the target's close.
            yield channel.exit
        other = SERVER if side == CLIENT else CLIENT
        if other == CLIENT or channel.open:
            yield ev.CloseChannel(other, ch)
        if self.is_idle:
            yield from self.session.between_operations()

    def _client_data(self, item: ev.ChannelData) -> Steps:
        channel = self.channels.get(item.channel)
        if channel is None:
            return
        channel.client_bytes += len(item.data)
        if channel.request is not None:
            self._record(CLIENT, message("data", item.channel, item.data))
            if len(channel.request) + len(item.data) > certificates.MAX_PUBLIC_KEY_BYTES:
                channel.request = None
                yield from self._refuse_channel(item.channel, "custody: no certificate: the public key is too large",
                                                FAILED_STATUS)
            else:
                channel.request += item.data
            return
        if channel.reader is not None:
            yield from self._sftp_requests(channel, item.data)
            return
        self._record(CLIENT, message("data", item.channel, item.data))
        if not channel.open:
            return
        if channel.lines is None:
            yield Send(SERVER, item.data, ev.channel_name(item.channel))
            return
        for piece in channel.lines.feed(item.data):
            if piece.line is None or (yield from self._typed_line(channel, piece.line)):
                if item.channel in self.channels:
                    yield Send(SERVER, piece.data, ev.channel_name(item.channel))

    def _typed_line(self, channel: _Channel, line: terminal.Line) -> Generator[Any, Any, bool]:
        """A line typed in an interactive shell, at its Enter: a `command` operation; False: the Enter is withheld.

        Best effort (see `ingest.protocols.ssh.terminal`). A refused line is
        wiped from the target's line editor (^E ^U, then Enter for a fresh
        prompt) and the reason shown on the terminal; the shell goes on.
        """
        ch = channel.id
        if line.secret:  # typed at a password prompt: no text kept, no decision
            self._record(CLIENT, message("line", ch, attributes={"input": "secret", "redacted": "line"}))
            return True
        if line.full_screen or not line.text.strip():
            return True
        how = "uncertain" if line.uncertain else "typed"
        self._record(CLIENT, message("line", ch, line.text.encode(), attributes={"request": "shell", "input": how},
                                     operation="command", text=line.text, objects=list(_objects(line.text))))
        self._notice_channel = ch
        verdict = yield from self.session.check(Operation("ssh", "command", line.text, _objects(line.text),
                                                          self._attributes(request="line", input=how)))
        self._notice_channel = None
        if verdict.allowed or ch not in self.channels:
            return True
        text = f"\r\ncustody: {verdict.reason}\r\n".encode()
        yield self.session.say(Said(text, [message("data", ch, text, {"stream": "stderr", **records.PROXY_ORIGIN})],
                                    channel=ev.channel_name(ch, stderr=True)))
        self._record(CLIENT, message("data", ch, WIPE_LINE, dict(records.PROXY_ORIGIN)))
        yield Send(SERVER, WIPE_LINE, ev.channel_name(ch))
        return False

    def _server_data(self, channel: _Channel, item: ev.ChannelData) -> Steps:
        channel.server_bytes += len(item.data)
        if channel.replies is not None and not item.stderr:
            yield from self._sftp_replies(channel, item.data)
            return
        data = item.data
        record = message("data", channel.id, data, {"stream": "stderr"} if item.stderr else None)
        plan = self._mask_plan() if channel.terminal else None
        masked = mask_terminal(plan.scanner, data) if plan is not None else None
        if masked is not None:  # the client sees, and the record keeps, the masked text; the original sealed
            data = masked[0]
            record.update(data=data, sealed_original=self.session.gate.seal(item.data))
            record["attributes"].update(masked=",".join(masked[1]))
        self._record(SERVER, record)
        if channel.lines is not None:
            channel.lines.output(data)
        yield Send(CLIENT, data, ev.channel_name(channel.id, item.stderr))

    def _mask_plan(self) -> Any:
        """The session's current mask plan (a reloaded policy's from the next packet on); None: nothing masked."""
        gate = self.session.gate
        if gate is None:
            return None
        gate.refresh()
        return gate.mask_plan

    def _certificate(self, channel: _Channel) -> Steps:
        """`custody ssh-login`: the client's public key (all of it, at its EOF) gets a certificate of this identity."""
        ch, request = channel.id, bytes(channel.request or b"")
        channel.request = None
        assert self.settings.user_ca is not None and self.session.identity is not None
        try:
            cert = certificates.issue(self.settings.user_ca, request, self.session.identity, datetime.now(timezone.utc))
        except certificates.CertificateRefused as refused:
            yield from self._refuse_channel(ch, f"custody: no certificate: {refused}", FAILED_STATUS)
            return
        line = cert.export_certificate()
        yield self.session.say(Said(line, [message("data", ch, line, {
            "certificate": "issued", **certificates.describe(cert), **records.PROXY_ORIGIN})],
            channel=ev.channel_name(ch)))
        self._record(SERVER, message("exit-status", ch, attributes={"status": "0", **records.PROXY_ORIGIN},
                                     outcome="ok"))
        yield ev.Exit(ch, status=0)

    # --- SFTP ---------------------------------------------------------------------------------------

    def _sftp_requests(self, channel: _Channel, data: bytes) -> Steps:
        assert channel.reader is not None and channel.transfers is not None
        passed: list[bytes] = []
        for raw in channel.reader.feed(data):
            packet = sftp.decode(raw)
            operation = self._sftp_operation(channel, packet)
            record = _sftp_record(packet, channel.id)
            if operation is not None:
                record.update(operation="transfer", text=operation.text, objects=list(operation.objects))
            self._record(CLIENT, record)
            if operation is not None:
                if passed:
                    yield Send(SERVER, b"".join(passed), ev.channel_name(channel.id))
                    passed = []
                verdict = yield from self.session.check(operation)
                if not verdict.allowed:
                    reply = sftp.status(packet.id, sftp.PERMISSION_DENIED, f"custody: {verdict.reason}")
                    yield self.session.say(Said(reply, [message(
                        "sftp:status", channel.id, reply, {"code": "permission_denied", "request_id": str(packet.id),
                                                           **records.PROXY_ORIGIN},
                        outcome="error", error_code="permission_denied", error_message=verdict.reason)],
                        channel=ev.channel_name(channel.id)))
                    continue
                channel.operations[packet.id] = operation.text
            if packet.type == sftp.CLOSE:
                channel.closing[packet.id] = packet.fields["handle"]
            channel.transfers.request(packet)
            passed.append(raw)
        if passed:
            yield Send(SERVER, b"".join(passed), ev.channel_name(channel.id))

    def _sftp_operation(self, channel: _Channel, packet: sftp.Packet) -> Operation | None:
        """An SFTP request that moves or changes files, as policy sees it; None for reads, stats, listings."""
        f = packet.fields
        if packet.type == sftp.OPEN:
            mode = sftp.open_mode(f["pflags"])
            return Operation("ssh", "transfer", f"sftp {mode} {f['path']}", (f["path"],),
                             self._attributes(subsystem="sftp", sftp="open", direction=mode,
                                              flags=sftp.flag_names(f["pflags"])))
        name = sftp.CHANGES.get(packet.type)
        if name is None and packet.type == sftp.EXTENDED and "path" in f and "rename" in f["extension"]:
            name = "rename"
        if name is None:
            return None
        paths = [p for p in (f.get("path"), f.get("new_path"), f.get("target")) if p]
        if packet.type == sftp.FSETSTAT:
            paths = [channel.transfers.path_of(f["handle"]) or "?"] if channel.transfers else ["?"]
        return Operation("ssh", "transfer", f"sftp {name} {' '.join(paths)}", tuple(paths),
                         self._attributes(subsystem="sftp", sftp=name))

    def _sftp_replies(self, channel: _Channel, data: bytes) -> Steps:
        assert channel.replies is not None and channel.transfers is not None
        for raw in channel.replies.feed(data):
            packet = sftp.decode(raw)
            record = _sftp_record(packet, channel.id)
            channel.transfers.response(packet)
            if packet.id is not None and packet.type in (sftp.STATUS, sftp.HANDLE):
                handle = channel.closing.pop(packet.id, None)
                if handle is not None:
                    done = channel.transfers.close(handle)
                    if done is not None:
                        record["attributes"].update({"path": done.path, "direction": done.mode, "size": str(done.size),
                                                     "sha256": done.sha256, "complete": str(done.complete).lower()})
                        record["objects"] = [done.path]
                if channel.operations.pop(packet.id, None) is not None:
                    failed = packet.type == sftp.STATUS and packet.fields["code"] != sftp.OK
                    record["outcome"] = "error" if failed else "ok"
                    if failed:
                        record["error_code"] = sftp.STATUS_NAMES.get(packet.fields["code"], str(packet.fields["code"]))
                        record["error_message"] = packet.fields.get("message") or None
            self._record(SERVER, record)
        yield Send(CLIENT, data, ev.channel_name(channel.id))

    # --- forwarding ------------------------------------------------------------------------------------

    def _forward(self, item: ev.ForwardOpen) -> Steps:
        ch = item.channel
        destination = f"{item.host}:{item.port}"
        channel = self.channels[ch] = _Channel(ch, "forward", destination)
        self._record(CLIENT, message("direct-tcpip", ch, attributes={
            "host": item.host, "port": str(item.port), "origin": f"{item.origin_host}:{item.origin_port}"},
            operation="forward", text=destination, objects=[destination]))
        operation = Operation("ssh", "forward", destination, (destination,),
                              self._attributes(host=item.host, port=str(item.port), direction="local"))
        refused = yield from self._forward_refusal(operation)
        if refused is not None:
            yield from self._refuse_forward(channel, refused)
            return
        try:
            yield ev.OpenChannel(item)
        except ev.ChannelRefused as refused_by_target:
            yield from self._refuse_forward(channel, f"the target refused: {refused_by_target}")
            return
        channel.open = True
        self._record(SERVER, message("open-confirmation", ch, outcome="ok"))

    def _forward_refusal(self, operation: Operation, what: str = "port forwarding") -> Generator[Any, Any, str | None]:
        """Why a forwarding may not be made (None: it may). Closed by default: only a rule that names it opens it."""
        gate = self.session.gate
        if gate is None or gate.decide(operation).rule is None:
            reason = f"{what} is refused unless a policy rule allows it"
            self.session.record("policy_decision", records.decision(FORWARD_CLOSED_RULE, "block", reason,
                                                                    operation.text))
            return reason
        verdict = yield from self.session.check(operation)
        return None if verdict.allowed else verdict.reason

    def _remote_forward(self, item: ev.ForwardRequest) -> Steps:
        """tcpip-forward (`ssh -R`): allowed by a rule, the target listens on host:port and each connection to it
        is relayed to the client (`_forwarded`); else refused. The operation's object is the listen address."""
        listen = f"{item.host}:{item.port}"
        text = f"remote {listen}"
        self._record(CLIENT, message("tcpip-forward", None, attributes={"host": item.host, "port": str(item.port)},
                                     operation="forward", text=text, objects=[listen]))
        operation = Operation("ssh", "forward", text, (listen,),
                              self._attributes(host=item.host, port=str(item.port), direction="remote"))
        refused = yield from self._forward_refusal(operation)
        if refused is None:
            try:
                bound = yield ev.ListenTarget(item.host, item.port)
            except ev.ChannelRefused as refused_by_target:
                refused = f"the target refused: {refused_by_target}"
        if refused is not None:
            self._record(SERVER, message("request-failure", None, attributes={"reason": refused, **records.PROXY_ORIGIN},
                                         outcome="error", error_code="administratively_prohibited",
                                         error_message=refused))
            yield ev.ForwardAnswer(False)
            return
        self._record(SERVER, message("request-success", None, attributes={"host": item.host, "port": str(bound)},
                                     outcome="ok"))
        yield ev.ForwardAnswer(True)

    def _agent_forward(self, item: ev.ForwardRequest) -> Steps:
        """auth-agent-req (`ssh -A`) on a session channel: a `forward` "agent" (direction agent), closed by default.

        Allowed, the target's session asks for the agent too, and each agent
        channel the target opens is relayed to the client's agent (`_forwarded`).
        """
        self._record(CLIENT, message("auth-agent-req", item.channel, operation="forward", text="agent", objects=[]))
        refused = yield from self._forward_refusal(Operation("ssh", "forward", "agent", (),
                                                             self._attributes(direction="agent")), "agent forwarding")
        if refused is not None:
            self._record(SERVER, message("request-failure", item.channel, attributes={
                "reason": refused, **records.PROXY_ORIGIN}, outcome="error", error_code="administratively_prohibited",
                error_message=refused))
        else:
            self._record(SERVER, message("request-success", item.channel, outcome="ok"))
        yield ev.ForwardAnswer(refused is None)

    def _forwarded(self, item: ev.ForwardedOpen) -> Steps:
        """A channel the target opens: to its remote forwarding listener (forwarded-tcpip) or to the agent, opened
        to the client.

        The listener or agent was allowed by policy; each connection is
        recorded (the `forward` operation, its origin, then its bytes and
        counts as a direct-tcpip's), not decided again.
        """
        ch = item.channel
        if item.agent:
            kind, text, attributes, objects = "auth-agent", "agent", {}, []
        else:
            listen = f"{item.host}:{item.port}"
            kind, text, objects = "forwarded-tcpip", f"remote {listen}", [listen]
            attributes = {"host": item.host, "port": str(item.port), "origin": f"{item.origin_host}:{item.origin_port}"}
        channel = self.channels[ch] = _Channel(ch, "forward", objects[0] if objects else text)
        self._record(SERVER, message(kind, ch, attributes=attributes, operation="forward", text=text, objects=objects))
        try:
            yield ev.OpenChannel(item)
        except ev.ChannelRefused as refused:
            self.channels.pop(ch, None)
            reason = f"the client refused: {refused}"
            self._record(CLIENT, message("open-failure", ch, attributes={"reason": reason}, outcome="error",
                                         error_code="connect_failed", error_message=reason))
            yield ev.CloseChannel(SERVER, ch)
            return
        if ch in self.channels:
            channel.open = True
            self._record(CLIENT, message("open-confirmation", ch, outcome="ok"))

    def _refused_request(self, item: ev.ForwardRequest) -> None:
        """X11 forwarding is never relayed: the request and its refusal, as a block."""
        text, attributes = "x11", {"x11": item.detail} if item.detail else {}
        reason = f"{item.kind} forwarding is refused through Custody"
        self._record(CLIENT, message("x11-req", item.channel, attributes=attributes, operation="forward", text=text,
                                     objects=[]))
        self.session.record("policy_decision", records.decision(FORWARD_CLOSED_RULE, "block", reason, text))
        self._record(SERVER, message("request-failure", item.channel, attributes={"reason": reason, **records.PROXY_ORIGIN},
                                     outcome="error", error_code="administratively_prohibited", error_message=reason))

    def _refuse_forward(self, channel: _Channel, reason: str) -> Steps:
        self.channels.pop(channel.id, None)
        self._record(SERVER, message("open-failure", channel.id, attributes={"reason": reason, **records.PROXY_ORIGIN},
                                     outcome="error", error_code="administratively_prohibited", error_message=reason))
        yield ev.CloseChannel(CLIENT, channel.id)

    # --- what only SSH can say ---------------------------------------------------------------------

    def goodbye(self, ending: Ending) -> Said:
        """A line for the client (an auth banner before login, the disconnect reason after)."""
        if ending.reason == "auth_failed":
            text = f"custody: authentication failed for {self.user!r}: {ending.code}"
        else:
            text = f"custody: {ending.text}"
        return Said((text + "\r\n").encode(), [message("disconnect", None, (text + "\r\n").encode(),
                                                       {"reason": ending.reason, **records.PROXY_ORIGIN})])

    def hold_notice(self, request: ApprovalRequest, decision: Decision) -> Said | None:
        ch = self._notice_channel
        if ch is None:
            return None
        text = (f"custody: {decision.message}; waiting for approval, request {request.request_id} "
                f"(a reviewer runs: custody approvals approve {request.request_id} --reason ...; "
                f"denied unless approved by {request.expires_at})\r\n").encode()
        return Said(text, [message("data", ch, text, {"stream": "stderr", **records.PROXY_ORIGIN})],
                    channel=ev.channel_name(ch, stderr=True))


def _objects(command: str) -> tuple[str, ...]:
    """The paths an exec command line names, as the SSH analyzer reads them (none if it cannot be read)."""
    try:
        return shell_objects(command)
    except AnalysisError:
        return ()


def _legacy_scp(command: str) -> tuple[str, tuple[str, ...]] | None:
    """`scp -t PATH` (the client uploads) or `scp -f PATH` (it downloads): (direction, paths); else None."""
    import shlex

    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if not argv or argv[0].rsplit("/", 1)[-1] != "scp":
        return None
    flags = [a for a in argv[1:] if a.startswith("-")]
    paths = tuple(a for a in argv[1:] if not a.startswith("-") and a != "--")
    if any("t" in f for f in flags):
        return "upload", paths
    if any("f" in f for f in flags):
        return "download", paths
    return None


def _sftp_record(packet: sftp.Packet, channel: int) -> records.Record:
    """An SFTP packet as a Message record: its wire bytes (file data included) and its decoded fields."""
    f = packet.fields
    attributes: dict[str, str] = {}
    if packet.id is not None:
        attributes["request_id"] = str(packet.id)
    for key in ("path", "new_path", "target", "extension", "offset", "length", "version"):
        if key in f:
            attributes[key] = str(f[key])
    if "pflags" in f:
        attributes["flags"] = sftp.flag_names(f["pflags"])
    if "handle" in f:
        attributes["handle"] = f["handle"].hex()
    if packet.type == sftp.STATUS:
        attributes["code"] = sftp.STATUS_NAMES.get(f["code"], str(f["code"]))
        if f.get("message"):
            attributes["message"] = f["message"]
    if packet.type == sftp.NAME:
        attributes["names"] = str(len(f["names"]))
    return message(f"sftp:{packet.name}", channel, packet.raw, attributes)

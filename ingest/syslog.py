"""The syslog sink: violations (and activity) to a SOC's syslog receiver, RFC 5424 messages.

Transports: `udp://host:port` (RFC 5426, one message per datagram: no delivery guarantee), `tcp://host:port`
(RFC 6587 octet counting) and `tls://host:port` (RFC 5425: TLS, the same octet-counted framing; the receiver's
certificate checked against `syslog_ca`, a client certificate optional).

The sink is a Kafka consumer group (`[soc] syslog_group`) on the OCSF topics (or on custody.violations, for
Custody's own shape). It is a process of its own, so a slow or absent receiver never holds up the ledger's
sealing; Kafka keeps what it has not forwarded. Offsets are committed only for what was written to a connection
that is still open `confirm_seconds` later (syslog has no acknowledgement: a receiver that stops may have
dropped what was in its socket buffer). When the connection fails, the sink goes back to the committed offsets
and resends from there once the receiver is back, with growing pauses between attempts: nothing is dropped,
and what was sent just before an outage may arrive twice — de-duplicate on the id (`metadata.uid`, in the
structured data as `id`).

Each message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [custody@32473 id=… session=… class_uid=…] JSON`,
facility log audit (13), the severity from the document's; MSGID `OCSF-<class_uid>` or `custody.violation`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from ingest import kafka
from ingest.settings import KafkaSettings, SocSettings

log = logging.getLogger(__name__)

FACILITY = 13  # log audit
ENTERPRISE = 32473  # RFC 5612's documentation number: the SD-ID is custody@32473
# OCSF severity_id -> syslog severity: Informational 6, Low 5 (notice), Medium 4, High 3, Critical 2, Fatal 1.
SEVERITY = {0: 6, 1: 6, 2: 5, 3: 4, 4: 3, 5: 2, 6: 1, 99: 6}
CUSTODY_SEVERITY = {"info": 6, "low": 5, "medium": 4, "high": 3, "critical": 2}


def _sd_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _printable(value: str, limit: int) -> str:
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return out or "-"


def message(document: dict[str, Any], *, app_name: str = "custody", hostname: str | None = None,
            procid: str | None = None) -> bytes:
    """One RFC 5424 message for an OCSF document or a custody.violation/v1 one."""
    if "class_uid" in document:
        severity = SEVERITY.get(document.get("severity_id", 0), 6)
        msgid, when = f"OCSF-{document['class_uid']}", _rfc3339(document["time"])
        uid = document["metadata"]["uid"]
        session = document["metadata"].get("correlation_uid")
        params = {"id": uid, "class_uid": document["class_uid"], "session": session,
                  "version": document["metadata"]["version"]}
    else:
        severity = CUSTODY_SEVERITY.get(document.get("severity"), 6)
        msgid, when = "custody.violation", document["time"]
        params = {"id": document["id"], "session": document.get("session_id"), "category": document.get("category")}
    sd = f"[custody@{ENTERPRISE} " + " ".join(f'{k}="{_sd_value(v)}"' for k, v in params.items() if v is not None) + "]"
    header = (f"<{FACILITY * 8 + severity}>1 {when} {_printable(hostname or socket.gethostname(), 255)} "
              f"{_printable(app_name, 48)} {_printable(procid or str(os.getpid()), 128)} {_printable(msgid, 32)}")
    body = json.dumps(document, sort_keys=True, separators=(",", ":"))  # ASCII (escaped): MSG needs no BOM
    return f"{header} {sd} {body}".encode()


def octet_counted(msg: bytes) -> bytes:
    """RFC 6587 / RFC 5425 framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(msg)).encode() + b" " + msg


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def parse(cls, url: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> Destination:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or not parts.port:
            raise ValueError(f"{url!r}: expected udp://host:port, tcp://host:port or tls://host:port")
        return cls(parts.scheme, parts.hostname, parts.port, ca, cert, key)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class Connection:
    """One connection to the receiver; `alive()` tells whether the peer has closed or reset it."""

    def __init__(self, destination: Destination, timeout: float = 10.0):
        self.destination = destination
        d = destination
        if d.scheme == "udp":
            self.sock = socket.socket(socket.AF_INET6 if ":" in d.host else socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect((d.host, d.port))
            return
        raw = socket.create_connection((d.host, d.port), timeout=timeout)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if d.scheme == "tls":
            context = ssl.create_default_context(cafile=str(d.ca) if d.ca else None)
            if d.cert:
                context.load_cert_chain(str(d.cert), str(d.key) if d.key else None)
            raw = context.wrap_socket(raw, server_hostname=d.host)
        raw.settimeout(timeout)
        self.sock = raw

    def send(self, messages: list[bytes]) -> None:
        if self.destination.scheme == "udp":
            for m in messages:
                self.sock.send(m)
        else:
            self.sock.sendall(b"".join(octet_counted(m) for m in messages))

    def alive(self) -> bool:
        if self.destination.scheme == "udp":
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return True
            self.sock.setblocking(False)
            try:
                return bool(self.sock.recv(1))  # a receiver says nothing: readable means closed
            finally:
                self.sock.settimeout(10.0)
        except (ssl.SSLWantReadError, BlockingIOError):
            return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SyslogSink:
    """Forward the topics to the destination as a consumer group, resuming from the committed offset."""

    def __init__(self, kafka_settings: KafkaSettings, soc: SocSettings, destination: Destination,
                 topics: tuple[str, ...] | None = None, confirm_seconds: float = 2.0, max_backoff: float = 5.0):
        self.destination, self.soc, self.confirm_seconds, self.max_backoff = destination, soc, confirm_seconds, max_backoff
        names = topics or soc.sink_topics()
        kafka.ensure_topics(kafka_settings, names)
        self.consumer = kafka.consumer(kafka_settings, *(kafka_settings.topic(n) for n in names),
                                       group_id=soc.syslog_group, max_poll_records=500)
        self.connection: Connection | None = None
        self.unconfirmed: deque[tuple[float, dict[TopicPartition, int]]] = deque()
        self.sent = 0
        self.failures = 0  # connections lost in a row: the pause before the next attempt grows with them
        self.hostname = socket.gethostname()

    def _connect(self) -> Connection:
        backoff = 0.2
        while True:
            try:
                connection = Connection(self.destination)
                log.info("syslog sink: connected to %s", self.destination)
                return connection
            except OSError as exc:
                log.warning("syslog sink: %s unreachable (%s); retrying in %.1fs", self.destination, exc, backoff)
                if self._stop.wait(backoff):
                    raise
                backoff = min(backoff * 2, self.max_backoff)

    def _rewind(self) -> None:
        """Back to the committed offsets: everything not confirmed is sent again."""
        self.unconfirmed.clear()
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    def _fail(self, exc: Exception) -> None:
        log.warning("syslog sink: connection to %s lost (%s); resending from the committed offsets",
                    self.destination, exc)
        if self.connection is not None:
            self.connection.close()
        self.connection = None
        self._rewind()
        # A receiver that takes the connection and drops it (or a UDP port answering "unreachable") must not make
        # the sink resend the same batch in a tight loop: pause, longer each time, until something is confirmed.
        self.failures += 1
        self._stop.wait(min(0.2 * 2 ** (self.failures - 1), self.max_backoff))

    def _confirm(self, now: float) -> None:
        if self.connection is None or not self.unconfirmed:
            return
        if not self.connection.alive():
            self._fail(ConnectionError("closed by the receiver"))
            return
        offsets: dict[TopicPartition, int] = {}
        while self.unconfirmed and (now - self.unconfirmed[0][0] >= self.confirm_seconds
                                    or self.destination.scheme == "udp"):
            offsets.update(self.unconfirmed.popleft()[1])
        if offsets:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            self.failures = 0

    def step(self, timeout: float = 0.5) -> int:
        """One poll, sent; then commit what is confirmed. Returns how many messages were sent."""
        if self.connection is None:
            self.connection = self._connect()
        batches = self.consumer.poll(timeout_ms=int(timeout * 1000))
        records = [r for batch in batches.values() for r in batch]
        if records:
            out = [message(json.loads(r.value), app_name=self.soc.syslog_app_name, hostname=self.hostname)
                   for r in records]
            try:
                self.connection.send(out)
            except OSError as exc:
                self._fail(exc)
                return 0
            self.sent += len(out)
            self.unconfirmed.append((time.monotonic(), {tp: batch[-1].offset + 1 for tp, batch in batches.items()
                                                        if batch}))
        self._confirm(time.monotonic())
        return len(records)

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        try:
            while not stop.is_set():
                try:
                    self.step()
                except OSError:
                    if stop.is_set():
                        break
                    raise
        finally:
            self.close()

    _stop = threading.Event()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.consumer.close(autocommit=False)

"""OCSF: what Custody knows, in the Open Cybersecurity Schema Framework a SOC's pipeline already reads.

One class per fact (schemas/OCSF.md maps every field):

* Authentication (3002): a login with a verified token (Logon, Success) and a refused one (Failure, the
  reason code in `status_code`);
* Detection Finding (2004): policy blocks, approval denials and expiries, protocol errors and quarantined
  events — the rule, the statement/command/request, the evidence's event id and session;
* per-protocol activity, one document per operation (what the `activity` view shows): Datastore Activity
  (6005) for PostgreSQL and MySQL statements, SSH Activity (4007) for commands and transfers, HTTP Activity
  (4002) for requests, API Activity (6003) for Kubernetes verbs.

Every document links back to the sealed evidence in `unmapped.custody`: session id, event id, leaf index, the
ledger's origin, partition, seal number and the checkpoint size (tree size) that covers it; `metadata.uid` is
deterministic (the violation's id, or event id + message index for an operation) so a SOC de-duplicates on it.
The ledger renders them only after the seal is durable (`Renderer.sealed`), like `custody.violations`.

The documents validate against the JSON Schema compiled from the tagged ocsf/ocsf-schema release VERSION
(tests/ocsf/, with the tag and commit); profiles used: `host` (actor) and `security_control` (action,
disposition).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from ingest.events import SignedEvent
from ingest.sessions import NO_IDENTITY, SessionIdentity

VERSION = "1.8.0"
PROFILES = ["host", "security_control"]
PRODUCT = {"name": "Custody", "vendor_name": "Custody", "uid": "custody"}

AUTHENTICATION, DETECTION_FINDING = 3002, 2004
DATASTORE_ACTIVITY, SSH_ACTIVITY, HTTP_ACTIVITY, API_ACTIVITY = 6005, 4007, 4002, 6003
CATEGORY = {3002: 3, 2004: 2, 6005: 6, 4007: 4, 4002: 4, 6003: 6}
CATEGORY_NAME = {2: "Findings", 3: "Identity & Access Management", 4: "Network Activity", 6: "Application Activity"}
CLASS_NAME = {3002: "Authentication", 2004: "Detection Finding", 6005: "Datastore Activity", 4007: "SSH Activity",
              4002: "HTTP Activity", 6003: "API Activity"}
ACTIVITY_CLASS = {"postgres": DATASTORE_ACTIVITY, "mysql": DATASTORE_ACTIVITY, "ssh": SSH_ACTIVITY,
                  "http": HTTP_ACTIVITY, "kubernetes": API_ACTIVITY}
DATABASE_TYPE = {"postgres": "PostgreSQL", "mysql": "MySQL"}

SEVERITY = {"info": (1, "Informational"), "low": (2, "Low"), "medium": (3, "Medium"), "high": (4, "High"),
            "critical": (5, "Critical")}
STATUS = {"ok": (1, "Success"), "error": (2, "Failure"), None: (0, "Unknown")}
# Datastore Activity activity_id by the statement's first keyword (4 Query otherwise).
SQL_ACTIVITY = {"select": (1, "Read"), "show": (1, "Read"), "with": (4, "Query"), "insert": (5, "Write"),
                "replace": (5, "Write"), "copy": (5, "Write"), "load": (5, "Write"), "update": (2, "Update"),
                "alter": (2, "Update"), "delete": (7, "Delete"), "drop": (7, "Delete"), "truncate": (7, "Delete"),
                "create": (6, "Create")}
HTTP_METHOD = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7, "TRACE": 8,
               "PATCH": 9}
KUBE_VERB = {"create": (1, "Create"), "get": (2, "Read"), "list": (2, "Read"), "watch": (2, "Read"),
             "update": (3, "Update"), "patch": (3, "Update"), "delete": (4, "Delete"),
             "deletecollection": (4, "Delete")}
SSH_AUTH = {"password": (5, "Password"), "keyboard-interactive": (4, "Keyboard Interactive"),
            "publickey": (6, "Public Key")}
# security_control: what the proxy did about it.
POLICY_ACTION = {"block": (2, "Denied", 2, "Blocked"), "deny": (2, "Denied", 25, "Rejected"),
                 "mask": (4, "Modified", 1, "Allowed"), "approve": (1, "Allowed", 8, "Approved"),
                 "allow": (1, "Allowed", 1, "Allowed"), "hold": (3, "Observed", 14, "Delayed")}
FINDING_DISPOSITION = {"policy_block": (2, "Denied", 2, "Blocked"), "approval_denied": (2, "Denied", 25, "Rejected"),
                       "approval_expired": (2, "Denied", 25, "Rejected"),
                       "auth_failure": (2, "Denied", 26, "Unauthorized"),
                       "protocol_error": (2, "Denied", 27, "Error"),
                       "quarantine": (3, "Observed", 3, "Quarantined")}


class Evidence(NamedTuple):
    """Where the evidence is sealed: the ledger's origin, the partition's seal and its checkpoint size."""
    origin: str
    partition: int
    seal: int
    checkpoint_size: int


def _ms(micros: int) -> int:
    return micros // 1000


def _iso_ms(when: str) -> int:
    return int(datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp() * 1000)


def endpoint(address: str | None) -> dict[str, Any] | None:
    """`10.0.0.5:51544` / `[::1]:5432` as a network_endpoint; anything else by name."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        out: dict[str, Any] = {"ip": str(ipaddress.ip_address(host))}
    except ValueError:
        return {"name": address}
    if port.isdigit():
        out["port"] = int(port)
    return out


def user(identity: SessionIdentity | None, attributes: dict[str, str] | None = None) -> dict[str, Any]:
    """The verified identity as an OCSF user; without one, the name the client asked to log in as."""
    attributes = attributes or {}
    if identity is None or identity.subject is None:
        return {"name": attributes.get("user") or "unknown", "type_id": 0, "type": "Unknown"}
    out: dict[str, Any] = {"uid": identity.subject, "name": identity.email or identity.subject, "type_id": 1,
                           "type": "User"}
    if identity.email:
        out["email_addr"] = identity.email
    if identity.groups:
        out["groups"] = [{"name": g} for g in identity.groups]
    if attributes.get("user"):
        out["account"] = {"name": attributes["user"], "type_id": 99, "type": f"{identity.protocol or 'target'} user"}
    return out


def _session(session_id: str | None, identity: SessionIdentity | None) -> dict[str, Any] | None:
    if session_id is None:
        return None
    out: dict[str, Any] = {"uid": session_id, "is_remote": True}
    if identity is not None and identity.issuer:
        out["issuer"] = identity.issuer
    return out


def _target(identity: SessionIdentity | None) -> dict[str, Any] | None:
    if identity is None or identity.target is None:
        return None
    out = {"name": identity.target}
    if identity.protocol:
        out["svc_name"] = identity.protocol
    return out


def _link(session_id: str | None, event_id: str | None, leaf: int | None, evidence: Evidence | None,
          **more: Any) -> dict[str, Any]:
    custody: dict[str, Any] = {"session_id": session_id, "event_id": event_id}
    if leaf is not None:
        custody["leaf_index"] = leaf
    if evidence is not None:
        custody["ledger"] = {"origin": evidence.origin, "partition": evidence.partition, "seal": evidence.seal,
                             "checkpoint_origin": f"{evidence.origin}/p{evidence.partition}",
                             "checkpoint_size": evidence.checkpoint_size}
    custody.update({k: v for k, v in more.items() if v is not None})
    return {"custody": custody}


def _base(class_uid: int, activity: tuple[int, str], *, uid: str, time_ms: int, severity: str,
          session_id: str | None, event_id: str | None, message: str | None) -> dict[str, Any]:
    category = CATEGORY[class_uid]
    severity_id, severity_name = SEVERITY[severity]
    metadata: dict[str, Any] = {"version": VERSION, "product": PRODUCT, "profiles": PROFILES, "uid": uid,
                                "log_name": "custody.events", "log_provider": "custody ledger"}
    if session_id:
        metadata["correlation_uid"] = session_id
    if event_id:
        metadata["original_event_uid"] = event_id
    out = {"class_uid": class_uid, "class_name": CLASS_NAME[class_uid], "category_uid": category,
           "category_name": CATEGORY_NAME[category], "activity_id": activity[0], "activity_name": activity[1],
           "type_uid": class_uid * 100 + activity[0], "type_name": f"{CLASS_NAME[class_uid]}: {activity[1]}",
           "time": time_ms, "severity_id": severity_id, "severity": severity_name, "metadata": metadata}
    if message:
        out["message"] = message
    return out


def _put(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    doc.update({k: v for k, v in fields.items() if v is not None})
    return doc


def _action(doc: dict[str, Any], action: tuple[int, str, int, str] | None) -> None:
    if action is not None:
        doc.update(action_id=action[0], action=action[1], disposition_id=action[2], disposition=action[3])


def _actor(identity: SessionIdentity | None, attributes: dict[str, str] | None,
           session_id: str | None, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"user": user(identity, attributes)}
    if session_id:
        out["session"] = _session(session_id, identity)
    if identity is not None and identity.client_application:
        out["app_name"] = identity.client_application
    out.update({k: v for k, v in more.items() if v is not None})
    return out


# --- Authentication -----------------------------------------------------------------------------------------


def logon(event: SignedEvent, identity: SessionIdentity, leaf: int | None, evidence: Evidence | None) -> dict:
    """A SessionStart with a verified identity: Authentication, Logon, Success (OpenID: the OIDC token)."""
    body = event.body
    attributes = body.get("attributes") or {}
    doc = _base(AUTHENTICATION, (1, "Logon"), uid=event.event_id, time_ms=_ms(event.envelope["ts"]),
                severity="info", session_id=event.session_id, event_id=event.event_id,
                message=f"{identity.subject} logged in to {identity.target} ({identity.protocol})")
    _put(doc, status_id=1, status="Success", user=user(identity, attributes), session=_session(event.session_id, identity),
         src_endpoint=endpoint(identity.source_address), dst_endpoint=_target(identity),
         service={"name": identity.target} if identity.target else None,
         auth_protocol_id=4, auth_protocol="OpenID", logon_type_id=3, logon_type="Network", is_remote=True,
         actor=_actor(identity, attributes, event.session_id),
         unmapped=_link(event.session_id, event.event_id, leaf, evidence, target=identity.target,
                        protocol=identity.protocol, client_cert_fingerprint=body.get("client_cert_fingerprint")))
    _action(doc, POLICY_ACTION["allow"])
    return doc


def _failed_logon(v: dict, identity: SessionIdentity | None, attributes: dict | None,
                  evidence: Evidence | None) -> dict:
    doc = _base(AUTHENTICATION, (1, "Logon"), uid=v["id"], time_ms=_iso_ms(v["time"]), severity=v["severity"],
                session_id=v["session_id"], event_id=v["event_id"], message=v.get("detail"))
    identity = identity or NO_IDENTITY
    _put(doc, status_id=2, status="Failure", status_code=v["reason"], status_detail=v.get("detail"),
         user=user(None, attributes), session=_session(v["session_id"], identity),
         src_endpoint=endpoint(v.get("source_address") or identity.source_address),
         dst_endpoint=_target(identity) or ({"name": v["target"]} if v.get("target") else None),
         service={"name": v.get("target") or identity.target or "custody"},
         auth_protocol_id=4, auth_protocol="OpenID", logon_type_id=3, logon_type="Network", is_remote=True,
         unmapped=_link(v["session_id"], v["event_id"], None, evidence, target=v.get("target"),
                        protocol=identity.protocol, category=v["category"]))
    _action(doc, FINDING_DISPOSITION["auth_failure"])
    return doc


# --- Detection Finding --------------------------------------------------------------------------------------


def _protocol_evidence(identity: SessionIdentity | None, attributes: dict | None, text: str | None) -> dict:
    """What the evidence names in the protocol's own objects: the database, the request."""
    protocol = identity.protocol if identity else None
    out: dict[str, Any] = {}
    if protocol in DATABASE_TYPE:
        out["database"] = {"name": (attributes or {}).get("database") or identity.target, "type_id": 1,
                           "type": DATABASE_TYPE[protocol]}
    elif protocol in ("http", "kubernetes") and text and " " in text:
        method, target = text.split(" ", 1)
        if method.isupper():
            out["http_request"] = _request(method, target, None)
    return out


def finding(v: dict, identity: SessionIdentity | None, attributes: dict | None, evidence: Evidence | None) -> dict:
    """A violation document (custody.violation/v1) as the OCSF class that states it."""
    if v["category"] == "auth_failure":
        return _failed_logon(v, identity, attributes, evidence)
    statement = v.get("statement")
    doc = _base(DETECTION_FINDING, (1, "Create"), uid=v["id"], time_ms=_iso_ms(v["time"]), severity=v["severity"],
                session_id=v["session_id"], event_id=v["event_id"],
                message=f"{v['category']}: {v['reason']}" + (f": {statement or v.get('detail')}"
                                                            if statement or v.get("detail") else ""))
    title = {"policy_block": "Blocked by policy", "approval_denied": "Approval denied",
             "approval_expired": "Approval expired", "protocol_error": "Protocol error",
             "quarantine": "Event quarantined by the ledger"}[v["category"]]
    info: dict[str, Any] = {"uid": v["id"], "title": f"{title}: {v['reason']}", "types": [v["category"]],
                            "analytic": {"name": v.get("rule") or v["reason"], "type_id": 1, "type": "Rule",
                                         "uid": v.get("rule") or v["reason"]},
                            "data_sources": ["custody.events"]}
    if v.get("detail"):
        info["desc"] = v["detail"]
    if v.get("event_id"):
        info["related_events"] = [{"uid": v["event_id"]}]
    who = identity if identity is not None and identity.subject else None
    item: dict[str, Any] = {"uid": v["event_id"] or v["id"], "name": v["category"],
                            "data": {k: v.get(k) for k in ("statement", "rule", "action", "reason", "detail",
                                                           "session_id", "event_id", "source") if v.get(k)}}
    _put(item, actor={"user": user(who, attributes), **({"session": _session(v["session_id"], identity)}
                                                         if v["session_id"] else {})},
         src_endpoint=endpoint(v.get("source_address")),
         dst_endpoint={"name": v["target"], **({"svc_name": identity.protocol} if identity and identity.protocol
                                                else {})} if v.get("target") else None,
         **_protocol_evidence(identity, attributes, statement))
    _put(doc, finding_info=info, status_id=1, status="New", evidences=[item], is_alert=True,
         actor=_actor(who, attributes, v["session_id"]) if who else None,
         unmapped=_link(v["session_id"], v["event_id"], None, evidence, target=v.get("target"),
                        protocol=identity.protocol if identity else None, category=v["category"],
                        source=v.get("source"), statement=statement))
    _action(doc, FINDING_DISPOSITION[v["category"]])
    return doc


# --- per-protocol activity ----------------------------------------------------------------------------------


def _request(method: str, target: str, attributes: dict | None) -> dict[str, Any]:
    path, _, query = target.partition("?")
    url: dict[str, Any] = {"path": path or "/", "url_string": target}
    if query:
        url["query_string"] = query
    if attributes and attributes.get("host"):
        url["hostname"] = attributes["host"].rsplit(":", 1)[0] if not attributes["host"].startswith("[") \
            else attributes["host"]
    return {"http_method": method, "url": url}


@dataclass
class Operation:
    """One operation of a session as the `activity` view groups it: its first message and what ended it."""
    session_id: str
    event_id: str
    message_no: int
    leaf: int | None
    ts_us: int
    identity: SessionIdentity
    attributes: dict[str, str]
    channel: str | None
    kind: str
    text: str | None
    objects: list[str]
    start: dict[str, str]
    outcome: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    end: dict[str, str] = field(default_factory=dict)
    ended_us: int | None = None
    policy: dict[str, Any] | None = None


def activity(op: Operation, evidence: Evidence | None) -> dict[str, Any]:
    """An operation as its protocol's OCSF activity class."""
    identity, protocol = op.identity, op.identity.protocol
    class_uid = ACTIVITY_CLASS.get(protocol or "", API_ACTIVITY)
    text = op.text or ""
    if class_uid == DATASTORE_ACTIVITY:
        act = SQL_ACTIVITY.get(text.split(None, 1)[0].lower() if text.strip() else "", (4, "Query"))
    elif class_uid == HTTP_ACTIVITY:
        method = op.start.get("method") or text.split(" ", 1)[0]
        act = (HTTP_METHOD.get(method, 99), method.title() if method in HTTP_METHOD else method or "Other")
    elif class_uid == API_ACTIVITY:
        verb = op.start.get("verb") or ""
        act = KUBE_VERB.get(verb, (99, verb or "Other"))
    else:  # SSH: a command, shell, transfer or forward on a channel of the connection
        act = (6, "Traffic")
    status_id, status = STATUS[op.outcome if op.outcome in STATUS else None]
    policy = op.policy or {}
    severity = "medium" if policy.get("action") in ("block", "deny") else "info"
    uid = f"{op.event_id}#{op.message_no}"
    doc = _base(class_uid, act, uid=uid, time_ms=_ms(op.ts_us), severity=severity, session_id=op.session_id,
                event_id=op.event_id, message=f"{op.kind}: {text}" if text else op.kind)
    actor = _actor(identity, op.attributes, op.session_id)
    _put(doc, status_id=status_id, status=status, status_code=op.error_code, status_detail=op.error_message,
         src_endpoint=endpoint(identity.source_address) or {"name": "unknown"}, dst_endpoint=_target(identity),
         actor=actor)
    if op.ended_us is not None and op.ended_us >= op.ts_us:
        doc.update(start_time=_ms(op.ts_us), end_time=_ms(op.ended_us), duration=_ms(op.ended_us - op.ts_us))
    if class_uid == DATASTORE_ACTIVITY:
        _put(doc, database={"name": op.attributes.get("database") or identity.target or "unknown", "type_id": 1,
                            "type": DATABASE_TYPE.get(protocol or "", protocol)},
             query_info={"uid": uid, "name": op.kind, "query_string": text}, type_id=1, type="Database")
        if op.objects and op.kind == "statement":  # a transfer's object is a file (LOAD DATA LOCAL), not a table
            doc["table"] = {"name": op.objects[0]}
    elif class_uid in (HTTP_ACTIVITY, API_ACTIVITY):
        method = op.start.get("method")
        target = op.start.get("request", text).split(" ", 1)[1] if " " in op.start.get("request", text) else None
        if method and target:
            request = _request(method, target, op.start)
            if op.start.get("kubectl_command"):
                request["user_agent"] = op.start["kubectl_command"]
            doc["http_request"] = request
        if op.end.get("status", "").isdigit():
            doc["http_response"] = {"code": int(op.end["status"])}
            if class_uid == HTTP_ACTIVITY:
                doc["http_status"] = int(op.end["status"])
        if class_uid == API_ACTIVITY:
            resource: dict[str, Any] = {}
            if op.start.get("resource"):
                resource["type"] = op.start["resource"] + (f"/{op.start['subresource']}"
                                                           if op.start.get("subresource") else "")
                resource["name"] = op.start.get("name") or op.start["resource"]
                if op.start.get("namespace"):
                    resource["namespace"] = op.start["namespace"]
                if op.start.get("name"):
                    resource["uid"] = "/".join(x for x in (op.start.get("namespace"), op.start["resource"],
                                                            op.start["name"]) if x)
                doc["resources"] = [resource]
    elif class_uid == SSH_ACTIVITY:
        method = op.attributes.get("auth_method")
        if method in SSH_AUTH:
            doc.update(auth_type_id=SSH_AUTH[method][0], auth_type=SSH_AUTH[method][1])
        doc["protocol_ver"] = "2.0"
        # OCSF's process needs pid, uid or cpid: the proxy sees no pid, so the operation's id is its uid
        actor["process"] = {"uid": uid, "cmd_line": text, "name": (text.split(None, 1) or [op.kind])[0]}
    _action(doc, POLICY_ACTION.get(policy.get("action"), POLICY_ACTION["allow"]))
    doc["unmapped"] = _link(op.session_id, op.event_id, op.leaf, evidence, message_index=op.message_no,
                            target=identity.target, protocol=protocol, operation=op.kind, objects=op.objects or None,
                            channel=op.channel, policy=policy or None,
                            kubernetes={k: op.start[k] for k in ("verb", "api_version", "namespace", "resource",
                                                                  "subresource", "name") if op.start.get(k)}
                            if class_uid == API_ACTIVITY else None)
    return doc


class Renderer:
    """One ledger partition's OCSF: fed every accepted event in order, emptied after each seal.

    Operations are paired with what ends them (their outcome, the next operation on the channel, the session's
    end); one still open at a seal is rendered after a later one. With `activity` off only the session
    attributes that findings name (protocol user, database) are kept.
    """

    def __init__(self, activity: bool, state: dict[str, Any] | None = None):
        self.activity = activity
        self.sessions: dict[str, dict[str, str]] = {}
        self.protocols: dict[str, str] = {}
        self.open: dict[str, dict[str | None, Operation]] = {}
        self.last: dict[str, Operation] = {}
        self.ready: list[Any] = []
        self.ended: list[str] = []
        if state:
            self.restore(state)

    def snapshot(self) -> dict[str, Any]:
        """What a restart needs to render on from the seal being written (the ledger keeps it in that seal's state
        snapshot): the SessionStart attributes and protocol of the sessions still open, and their operations still
        open, so one that ends after the restart is rendered, with the session's database and user."""
        ended = set(self.ended)
        ops = [op for sid, channels in self.open.items() if sid not in ended for op in channels.values()]
        open_ids = {id(op) for op in ops}
        return {"sessions": {s: a for s, a in self.sessions.items() if s not in ended},
                "protocols": {s: p for s, p in self.protocols.items() if s not in ended},
                "open": [{**{f: getattr(op, f) for f in Operation.__dataclass_fields__}, "identity": list(op.identity)}
                         for op in ops],
                "last": {s: [op.event_id, op.message_no] for s, op in self.last.items() if id(op) in open_ids}}

    def restore(self, state: dict[str, Any]) -> None:
        self.sessions.update(state.get("sessions") or {})
        self.protocols.update(state.get("protocols") or {})
        by_id: dict[tuple[str, int], Operation] = {}
        for item in state.get("open") or []:
            op = Operation(**{**item, "identity": SessionIdentity(*item["identity"])})
            self.open.setdefault(op.session_id, {})[op.channel] = op
            by_id[(op.event_id, op.message_no)] = op
        for session_id, (event_id, message_no) in (state.get("last") or {}).items():
            if (op := by_id.get((event_id, message_no))) is not None:
                self.last[session_id] = op

    def take(self, event: SignedEvent, identity: SessionIdentity, leaf: int | None) -> None:
        kind, session_id = event.envelope["kind"], event.envelope["session_id"]
        if kind == "session_start":
            body = event.envelope["body"]
            self.sessions[session_id] = body.get("attributes") or {}
            self.protocols[session_id] = body["protocol"]
            if self.activity and identity.subject is not None:
                self.ready.append((event, identity, leaf))
            return
        if not self.activity:
            if kind == "session_end":
                self.ended.append(session_id)
            return
        if kind == "frames":
            ts = event.envelope["ts"]
            channels = self.open.get(session_id)
            for i, m in enumerate(event.envelope["body"]["messages"]):
                channel, when = m.get("channel"), ts + (m.get("offset_us") or 0)
                if m.get("operation"):
                    if channels and channel in channels:
                        self._close(channels.pop(channel), None)
                    op = Operation(session_id, event.event_id, i, leaf, when, identity,
                                   self.sessions.get(session_id, {}), channel, m["operation"], m.get("text"),
                                   list(m.get("objects") or []), dict(m.get("attributes") or {}))
                    channels = self.open.setdefault(session_id, {})
                    channels[channel] = self.last[session_id] = op
                if m.get("outcome") and channels and channel in channels:
                    op = channels.pop(channel)
                    op.outcome, op.error_code, op.error_message = m["outcome"], m.get("error_code"), m.get("error_message")
                    op.end = dict(m.get("attributes") or {})
                    self._close(op, when)
        elif kind == "policy_decision":
            op = self.last.get(session_id)
            body = event.envelope["body"]
            if op is not None and body["rule"] != "authentication":
                op.policy = {"action": body["action"], "rule": body["rule"], "reason": body.get("reason"),
                             "event_id": event.event_id}
        elif kind == "session_end":
            for op in (self.open.pop(session_id, None) or {}).values():
                self._close(op, event.envelope["ts"])
            self.last.pop(session_id, None)
            self.ended.append(session_id)

    def _close(self, op: Operation, when: int | None) -> None:
        op.ended_us = when
        self.ready.append(op)

    def sealed(self, violations: list[dict], evidence: Evidence) -> tuple[list[dict], list[dict]]:
        """The OCSF documents the seal just made durable: (for custody.violations.ocsf, for custody.activity.ocsf)."""
        findings = []
        for v in violations:
            identity = self._identity(v)
            findings.append(finding(v, identity, self.sessions.get(v["session_id"] or ""), evidence))
        done = []
        for item in self.ready:
            if isinstance(item, Operation):
                done.append(activity(item, evidence))
            else:
                done.append(logon(*item[:2], item[2], evidence))
        self.ready = []
        for session_id in self.ended:
            self.sessions.pop(session_id, None)
            self.protocols.pop(session_id, None)
        self.ended = []
        return findings, done

    def _identity(self, v: dict) -> SessionIdentity | None:
        who = v.get("identity") or {}
        protocol = self.protocols.get(v["session_id"] or "")
        return SessionIdentity(who.get("subject"), who.get("email"), who.get("groups"), who.get("issuer"),
                               v.get("source_address"), v.get("target"), protocol)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

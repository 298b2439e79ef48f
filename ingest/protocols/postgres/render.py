"""How a recorded PostgreSQL session looks in a replay (see ingest/protocols/render.py).

Client runs become a `statement` step (the SQL of a Query, or of Parse + Bind,
with its parameters) or, without one, a `client` step listing the message
types. Server runs become a `result` step: columns, the first rows exactly as
the client saw them (read from the relayed, masked when masked, DataRow
bytes; a record may hold a run of rows of one read), command tags, errors,
notices, transaction status; an `error` step when an error is all there is.
Errors and notices use the fields the recorder already decoded.

Then `arrange` makes the replay read like the session rather than like its
network reads:

* The login exchange (SSLRequest/GSSENCRequest, StartupMessage, the
  authentication request, the token, AuthenticationOk, BackendKeyData, the
  ParameterStatus messages, the first ReadyForQuery) is one `login` step:
  `LOGIN ok as alice@example.com (13 server parameters)`, the parameters
  themselves in its JSON.
* An extended-protocol statement — one client run holding at most one Parse,
  one Bind and one Execute (and Describe, Sync), answered by the server runs
  up to its ReadyForQuery with nothing in between — is one `statement` step
  with its parameters and what came back (columns, rows, command tag, errors).
  Binary parameters of the common types (bool, integers, floats, text, oid)
  read as values by the types the Parse declared, and a Bind of a statement
  prepared earlier in the session names that statement's SQL. A Parse on
  its own (a driver preparing a statement) is one step too.

Simple-protocol Query and its result stay two steps, as psql shows them.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ..render import Description, Entry, Record, Reveal, Step, byte_summary, login_exchange
from ..render import frames_of as _frames
from ..render import types_of as _types
from . import messages as m
from .protocol import ProtocolViolation
from .records import split_run
from .summary import summarize


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


_REDACTABLE = frozenset({"Query", "Parse", "Bind"})


def _revealed_client(x: Record, reveal: Reveal | None) -> Record:
    """A client record whose secrets input redaction sealed: with `reveal`, as the client sent it."""
    if reveal is None or x.get("sealed_original") is None or x["type"] not in _REDACTABLE:
        return x
    data = reveal(x["sealed_original"])
    (message,) = split_run("client", {"data": data})
    fields = summarize(message)
    return {**x, "data": data, "statement": fields["statement"], "parameters": fields["parameters"],
            "revealed": True}


def _redacted(messages: list[Record]) -> list[str]:
    """What input redaction removed from these client records (tokens are not statements: left out)."""
    kinds = []
    for x in messages:
        if x["type"] in _REDACTABLE:
            kinds += [k for k in ((x.get("attributes") or {}).get("redacted") or "").split(",") if k]
    return list(dict.fromkeys(kinds))


def _client(messages: list[Record], reveal: Reveal | None = None) -> Step:
    """What the client sent: the statement (Query, or Parse + Bind) with its parameters, or just message types."""
    messages = [_revealed_client(x, reveal) for x in messages]
    statement = next((x["statement"] for x in messages if x.get("statement") is not None), None)
    parameters = next((x["parameters"] for x in messages if x.get("parameters") is not None), None)
    step: Step = {"step": "statement" if statement is not None or parameters is not None else "client",
                  "messages": [x["type"] for x in messages]}
    if step["step"] == "statement":
        step.update(statement=statement, parameters=parameters)
        step.update(_redaction(messages))
    return step


def _redaction(messages: list[Record]) -> Step:
    """`redacted` kinds and whether they are `revealed`, for a statement step (nothing when nothing was)."""
    kinds = _redacted(messages)
    return {"redacted": kinds, "revealed": any(x.get("revealed") for x in messages)} if kinds else {}


def _diagnostic(x: Record) -> dict[str, Any]:
    attributes = x.get("attributes") or {}
    return {"severity": attributes.get("severity_nonlocalized") or attributes.get("severity"),
            "code": x.get("error_code") or attributes.get("code"),
            "message": x.get("error_message") or attributes.get("message"),
            **{k: attributes[k] for k in ("detail", "hint") if k in attributes}}


def _columns(x: Record) -> list[str]:
    recorded = (x.get("attributes") or {}).get("columns")
    if recorded:
        return json.loads(recorded)
    (message,) = split_run("server", x)
    return [f.name for f in m.decode_row_description(message.payload).fields]


def _revealed(x: Record, reveal: Reveal | None) -> Record:
    if reveal is None or x.get("sealed_original") is None:
        return x
    return {**x, "data": reveal(x["sealed_original"])}


def _server(messages: list[Record], max_rows: int, reveal: Reveal | None) -> Step:
    """What came back: columns, the first rows (as the client saw them, or the originals when revealing), tags, errors, notices."""
    step: Step = {"step": "result", "columns": None, "rows": [], "masked_rows": [], "row_count": 0,
                  "command_tags": [], "errors": [], "notices": [], "messages": [x["type"] for x in messages],
                  "revealed": reveal is not None}
    for x in (_revealed(x, reveal) for x in messages):
        kind = x["type"]
        try:
            if kind == "RowDescription":
                step["columns"] = _columns(x)
            elif kind == "DataRow":
                for row in split_run("server", x):
                    if step["row_count"] < max_rows:
                        if x.get("sealed_original") is not None:
                            step["masked_rows"].append(len(step["rows"]))
                        step["rows"].append([_text(v) for v in m.decode_data_row(row.payload).values])
                    step["row_count"] += 1
            elif kind == "CommandComplete":
                step["command_tags"].append(x.get("command_tag"))
            elif kind == "ErrorResponse":
                step["errors"].append(_diagnostic(x))
            elif kind == "NoticeResponse":
                step["notices"].append(_diagnostic(x))
            elif kind == "ReadyForQuery":
                step["transaction_status"] = (x.get("attributes") or {}).get("transaction_status")
        except ProtocolViolation as error:  # signed and sealed, yet not PostgreSQL: say so, show the rest
            step.setdefault("undecodable", []).append(f"{kind}: {error.message} ({byte_summary(x['data'])})")
    if step["errors"] and not step["command_tags"] and not step["row_count"]:
        step["step"] = "error"
    return step


def _diagnostics(step: Step) -> list[str]:
    lines = [f"{e['severity'] or 'ERROR'} {e['code']}: {e['message']}" for e in step["errors"]]
    return lines + [f"{n['severity'] or 'NOTICE'} {n['code']}: {n['message']}" for n in step["notices"]]


def _result(step: Step) -> tuple[str, list[str]]:
    """Headline: the command tags, else the error; details: the other diagnostics."""
    tags = ", ".join(t for t in step["command_tags"] if t)
    diagnostics = _diagnostics(step)
    if tags:
        head = tags
    elif diagnostics:
        head, diagnostics = diagnostics[0], diagnostics[1:]
    else:
        head = " ".join(step["messages"])
    return head, diagnostics + [f"undecodable {line}" for line in step.get("undecodable", [])]


# --- arranging a session's steps -----------------------------------------------------------------

_LOGIN_CLIENT = frozenset({"SSLRequest", "GSSENCRequest", "StartupMessage", "PasswordMessage"})
_LOGIN_SERVER = frozenset({"EncryptionResponse", "AuthenticationRequest", "NegotiateProtocolVersion",
                           "BackendKeyData", "ParameterStatus", "NoticeResponse", "ReadyForQuery", "ErrorResponse"})
_ENCRYPTION = {"SSLRequest": "TLS", "GSSENCRequest": "GSSAPI encryption"}
_EXTENDED_CLIENT = frozenset({"Parse", "Bind", "Describe", "Execute", "Sync", "Flush"})
# Binary parameter formats by type OID: what psycopg and most drivers send for Python values.
_BINARY = {16: lambda b: b == b"\x01", 20: lambda b: struct.unpack(">q", b)[0], 21: lambda b: struct.unpack(">h", b)[0],
           23: lambda b: struct.unpack(">i", b)[0], 26: lambda b: struct.unpack(">I", b)[0],
           700: lambda b: struct.unpack(">f", b)[0], 701: lambda b: struct.unpack(">d", b)[0],
           25: lambda b: b.decode(), 1043: lambda b: b.decode(), 19: lambda b: b.decode()}


def _login(entries: list[Entry], start: Step | None, max_rows: int, reveal: Reveal | None) -> tuple[Step, int, list[Record]]:
    """The login step from the entries that begin the session: (step, entries used, server messages left over)."""
    client, server, used, rest, outcome = login_exchange(entries, _LOGIN_CLIENT | _LOGIN_SERVER,
                                                         {"ReadyForQuery": "ok", "ErrorResponse": "failed"})
    startup = next((x for x in client if x["type"] == "StartupMessage"), None)
    attributes = (startup or {}).get("attributes") or {}
    identity = (start or {}).get("identity") or {}
    answers = iter(x for x in server if x["type"] == "EncryptionResponse")
    encryption = []
    for x in client:
        if x["type"] in _ENCRYPTION:
            answer = next(answers, None)
            accepted = answer is not None and (answer.get("data") or b"")[:1] in (m.SSL_ALLOWED, m.GSSENC_ALLOWED)
            encryption.append({"asked": _ENCRYPTION[x["type"]], "accepted": accepted,
                               "reason": ((answer or {}).get("attributes") or {}).get("refused")})
    result = _server([x for x in server if x["type"] in ("ErrorResponse", "NoticeResponse")], max_rows, reveal)
    first = entries[0].step
    step: Step = {**{k: first[k] for k in ("seq", "ts", "offset_s") if k in first},
                  "step": "login", "direction": "both", "channel": None, "outcome": outcome,
                  "subject": identity.get("subject") if outcome == "ok" else None,
                  "user": attributes.get("user"), "database": attributes.get("database"),
                  "server_parameters": {(x.get("attributes") or {}).get("name"): (x.get("attributes") or {}).get("value")
                                        for x in server if x["type"] == "ParameterStatus"},
                  "encryption": encryption, "errors": result["errors"], "notices": result["notices"],
                  "messages": [x["type"] for x in client], "server_messages": [x["type"] for x in server]}
    return step, used, rest


def _binary_value(oid: int | None, shown: str | None) -> Any:
    if shown is None or oid not in _BINARY or not shown.startswith("\\x"):
        return shown
    try:
        return _BINARY[oid](bytes.fromhex(shown[2:]))
    except (ValueError, struct.error, UnicodeDecodeError):
        return shown


def _values(bind: Record, oids: list[int]) -> list[Any] | None:
    """A Bind's parameters as values: binary ones of known types decoded by the Parse's type OIDs."""
    parameters = bind.get("parameters")
    if parameters is None:
        return None
    try:
        formats = m.decode_bind(split_run("client", bind)[0].payload).parameter_formats
    except (ProtocolViolation, IndexError):
        return list(parameters)
    binary = [bool(formats[0])] * len(parameters) if len(formats) == 1 else [bool(f) for f in formats]
    binary += [False] * (len(parameters) - len(binary))
    return [_binary_value(oids[i] if i < len(oids) else None, p) if binary[i] else p
            for i, p in enumerate(parameters)]


def _extended(client: list[Record], prepared: dict[str, tuple[str | None, list[int]]]) -> Step | None:
    """One extended-protocol statement's client side (its SQL and parameter values), or None when it is not one."""
    types = [x["type"] for x in client]
    if not set(types) <= _EXTENDED_CLIENT or types.count("Parse") > 1:
        return None
    if types.count("Parse") == 1 and "Bind" not in types and "Execute" not in types:  # prepared, not run
        parse = next(x for x in client if x["type"] == "Parse")
        return {"step": "statement", "statement": parse.get("statement"), "parameters": None, "values": None,
                "prepared": (parse.get("attributes") or {}).get("statement_name") or "", "messages": types}
    if types.count("Execute") != 1 or types.count("Bind") != 1:
        return None
    parse = next((x for x in client if x["type"] == "Parse"), None)
    bind = next(x for x in client if x["type"] == "Bind")
    name = ((bind.get("attributes") or {}).get("statement_name")) or ""
    if parse is not None:
        oids = json.loads((parse.get("attributes") or {}).get("parameter_type_oids") or "[]")
        sql = parse.get("statement")
    else:
        sql, oids = prepared.get(name, (None, []))
    return {"step": "statement", "statement": sql, "parameters": bind.get("parameters"),
            "values": _values(bind, oids), "messages": types, **_redaction(client)}


def _remember(entry: Entry, prepared: dict[str, tuple[str | None, list[int]]]) -> None:
    """Named statements a Parse prepares, so a later Bind of one reads with its SQL."""
    for x in entry.messages or ():
        if x["type"] == "Parse":
            attributes = x.get("attributes") or {}
            prepared[attributes.get("statement_name") or ""] = (
                x.get("statement"), json.loads(attributes.get("parameter_type_oids") or "[]"))


def arrange(entries: list[Entry], max_rows: int, reveal: Reveal | None) -> list[Step]:
    out: list[Step] = []
    start = next((e.step for e in entries if e.step["step"] == "start"), None)
    prepared: dict[str, tuple[str | None, list[int]]] = {}
    logged_in = False
    i = 0
    while i < len(entries):
        entry = entries[i]
        if not logged_in and entry.messages is not None and _types(entry)[:1] and _types(entry)[0] in _LOGIN_CLIENT:
            step, used, rest = _login(entries[i:], start, max_rows, reveal)
            out.append(step)
            logged_in = True
            i += used
            if rest:  # what the target sent after its first ReadyForQuery, in the same read
                out.append({**entries[i - 1].step, **_server(rest, max_rows, reveal)})
            continue
        if entry.messages is not None:
            logged_in = True
            _remember(entry, prepared)
        statement = (_extended([_revealed_client(x, reveal) for x in entry.messages], prepared)
                     if _frames(entry, "client") else None)
        if statement is not None:
            j, server = _response(entries, i + 1)
            if server and server[-1]["type"] == "ReadyForQuery":
                result = _server(server, max_rows, reveal)
                result.pop("step")
                result["server_messages"] = result.pop("messages")
                out.append({**entry.step, **result, **statement, "direction": "both"})
                i = j
                continue
        if _frames(entry, "server") and "ReadyForQuery" not in _types(entry):
            j, server = _response(entries, i)
            out.append({**entry.step, **_server(server, max_rows, reveal)})
            i = j
            continue
        out.append(entry.step)
        i += 1
    return out


def _response(entries: list[Entry], i: int) -> tuple[int, list[Record]]:
    """The server messages from entry i up to the next ReadyForQuery, and the entry after them: one reply is one
    step however the recorder folded its reads into events (an ErrorResponse and its ReadyForQuery can arrive in
    two reads)."""
    server: list[Record] = []
    while i < len(entries) and _frames(entries[i], "server"):
        server += entries[i].messages
        i += 1
        if "ReadyForQuery" in _types(entries[i - 1]):
            break
    return i, server


def _login_description(step: Step) -> Description:
    who = step["subject"] or step["user"] or "(no user)"
    if step["outcome"] == "ok":
        n = len(step["server_parameters"])
        head = f"ok as {who} ({n} server parameter{'s' if n != 1 else ''})"
    elif step["outcome"] == "failed":
        error = step["errors"][0] if step["errors"] else {}
        head = f"failed for user {who}: {error.get('severity') or 'FATAL'} {error.get('code')}: {error.get('message')}"
    else:
        head = f"by user {who}, not completed"
    detail = [f"asked for {e['asked']}: {'accepted' if e['accepted'] else 'refused'}"
              + (f" ({e['reason']})" if e.get("reason") else "") for e in step["encryption"]]
    detail += [f"{n['severity'] or 'NOTICE'} {n['code']}: {n['message']}" for n in step["notices"]]
    return "LOGIN", head, detail


def _statement_description(step: Step) -> Description:
    sql = step["statement"] if step["statement"] is not None else "(prepared statement)"
    shown = step.get("values", step["parameters"])
    detail = [f"parameters: {json.dumps(shown, ensure_ascii=False)}"] if shown else []
    if step.get("redacted"):
        kinds = ", ".join(step["redacted"])
        detail.append(f"[revealed] {kinds}: as the client sent it" if step.get("revealed")
                      else f"[redacted] {kinds}: the original is sealed to the custodian key")
    if "command_tags" not in step:
        return "SQL", sql, detail
    head, diagnostics = _result(step)
    failed = step["errors"] and not step["command_tags"]
    if "prepared" in step and not failed:
        head = f'prepared as "{step["prepared"]}"' if step["prepared"] else "prepared (unnamed)"
    return ("ERROR" if failed else "SQL"), sql, detail + [f"→ {head}"] + diagnostics


class PostgresRenderer:
    protocol = "postgres"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        return _client(messages, reveal) if direction == "client" else _server(messages, max_rows, reveal)

    def arrange(self, entries: list[Entry], *, max_rows: int, reveal: Reveal | None) -> list[Step]:
        return arrange(entries, max_rows, reveal)

    def describe(self, step: Step) -> Description | None:
        kind = step["step"]
        if kind == "login":
            return _login_description(step)
        if kind == "statement":
            return _statement_description(step)
        if kind == "client":
            return "CLIENT", " ".join(step["messages"]), []
        if kind in ("result", "error"):
            head, body = _result(step)
            return ("ERROR" if kind == "error" else "RESULT"), head, body
        return None


RENDERER = PostgresRenderer()

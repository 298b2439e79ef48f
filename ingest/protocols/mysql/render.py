"""How a recorded MySQL session looks in a replay (see ingest/protocols/render.py).

Client runs become a `statement` step (COM_QUERY's SQL; COM_STMT_EXECUTE's
prepared SQL with its bound values; COM_STMT_PREPARE's SQL marked prepared),
a `login` step (the handshake response: user, schema, client; never the
token, which was not recorded), a `file` step (LOAD DATA LOCAL's file as
sent: its size and, at its end, the SHA-256), or a `client` step listing
the commands.
Server runs become a `result` step: columns, the first rows exactly as the
client saw them (text rows, and binary rows decoded by their column types),
OK counts, errors; an `error` step when an error is all there is.

Then `arrange` makes the replay read like the session rather than like its
network reads, as PostgreSQL's does:

* The login exchange (the proxy's Handshake, SSLRequest, HandshakeResponse,
  the switch to the clear-text plugin and the token's answer, up to the
  proxy's OK or ERR) is one `login` step: `LOGIN ok as eve@example.com to db
  with mysql-connector-python (TLS)`.
* A prepared statement — COM_STMT_PREPARE, its PrepareOK, what a driver
  sends in between for that statement (COM_STMT_RESET, SEND_LONG_DATA) and
  its first COM_STMT_EXECUTE with what came back — is one `statement` step
  with its bound values and its result. Each later EXECUTE with its result is
  one step too; a PREPARE that is never executed (or is refused) stays as it
  was. Nothing is folded across a policy decision or any other session step.

COM_QUERY and its result stay two steps, as the `mariadb` client shows them.
"""

from __future__ import annotations

import json

from ..render import Description, Entry, Record, Reveal, Step, byte_summary, login_exchange
from ..render import frames_of as _frames
from ..render import types_of as _types
from . import messages as m
from .packets import PacketReader, ProtocolViolation

_TYPE_CODES = {name: code for code, name in m.TYPE_NAMES.items()}
_LOGIN = frozenset({"HandshakeResponse", "AuthSwitchResponse", "AuthFullResponse", "SSLRequest"})
_SERVER_LOGIN = frozenset({"Handshake", "AuthSwitchRequest", "AuthMoreData"})


_REDACTABLE = frozenset({"COM_QUERY", "COM_STMT_PREPARE", "COM_STMT_EXECUTE", "COM_STMT_SEND_LONG_DATA"})


def _revealed_client(x: Record, reveal: Reveal | None) -> Record:
    """A client record whose secrets input redaction sealed: with `reveal`, as the client sent it.

    An EXECUTE's original is decoded with its recorded parameter count and types; its SQL stays as
    recorded (the PREPARE's original holds it)."""
    if reveal is None or x.get("sealed_original") is None or x["type"] not in _REDACTABLE:
        return x
    data = reveal(x["sealed_original"])
    (packet,) = PacketReader("client", 1 << 30).feed(data)
    out = {**x, "data": data, "revealed": True}
    try:
        if x["type"] in ("COM_QUERY", "COM_STMT_PREPARE"):
            out["statement"] = packet.payload[1:].decode("utf-8", "replace")
        elif x["type"] == "COM_STMT_EXECUTE" and x.get("parameters") is not None:
            shown = x["parameters"]
            names = json.loads((x.get("attributes") or {}).get("parameter_types") or "[]")
            types = tuple((_TYPE_CODES.get(n.removesuffix(" UNSIGNED"), 253), n.endswith(" UNSIGNED")) for n in names)
            execute = m.decode_execute(packet.payload, len(shown), types if len(types) == len(shown) else None)
            out["parameters"] = [v if v is not None else s for v, s in zip(execute.texts(), shown)]
    except (ProtocolViolation, ValueError):
        pass
    return out


def _redaction(messages: list[Record]) -> Step:
    kinds: list[str] = []
    for x in messages:
        if x["type"] in _REDACTABLE:
            kinds += [k for k in ((x.get("attributes") or {}).get("redacted") or "").split(",") if k]
    kinds = list(dict.fromkeys(kinds))
    return {"redacted": kinds, "revealed": any(x.get("revealed") for x in messages)} if kinds else {}


def _client(messages: list[Record], reveal: Reveal | None = None) -> Step:
    messages = [_revealed_client(x, reveal) for x in messages]
    for x in messages:
        if x["type"] in ("COM_QUERY", "COM_STMT_EXECUTE", "COM_STMT_PREPARE") and x.get("statement") is not None:
            return {"step": "statement", "messages": [y["type"] for y in messages], "statement": x["statement"],
                    "parameters": x.get("parameters"), "prepared": x["type"] == "COM_STMT_PREPARE",
                    **_redaction(messages)}
    if all(x["type"] in _FILE for x in messages):
        end = next(((x.get("attributes") or {}) for x in messages if x["type"] == "LocalInfileEnd"), None)
        return {"step": "file", "messages": [x["type"] for x in messages], "complete": end is not None,
                "bytes": sum(len(p) for x in messages if x["type"] == "LocalInfileData" for p in _packets(x)),
                "total_bytes": (end or {}).get("bytes"), "sha256": (end or {}).get("sha256"),
                "refused": (end or {}).get("refused") == "true"}
    if all(x["type"] in _LOGIN for x in messages):
        attributes = next((x.get("attributes") or {} for x in messages if x["type"] == "HandshakeResponse"), {})
        return {"step": "login", "messages": [x["type"] for x in messages], "user": attributes.get("user"),
                "database": attributes.get("database"), "client": attributes.get("attr._client_name")}
    return {"step": "client", "messages": [x["type"] for x in messages]}


def _column(attributes: dict) -> m.Column:
    kind = _TYPE_CODES.get(attributes.get("type", ""), 253)
    return m.Column("", attributes.get("table", ""), "", attributes.get("name", ""), attributes.get("org_name", ""),
                    33, 0, kind, 0, 0)


def _packets(x: Record) -> list[bytes]:
    return [p.payload for p in PacketReader("server", 1 << 30).feed(x["data"])]


def _row_text(payload: bytes, columns: list[m.Column], binary: bool) -> list[str | None]:
    if not binary:
        return [None if v is None else v.decode("utf-8", "replace") for v in m.decode_text_row(payload, len(columns))]
    values = m.decode_binary_row(payload, columns)
    return [None if v is None else m.binary_text(c.type, v, c.unsigned) for c, v in zip(columns, values)]


def _server(messages: list[Record], max_rows: int, reveal: Reveal | None) -> Step:
    step: Step = {"step": "result", "columns": None, "rows": [], "masked_rows": [], "row_count": 0,
                  "command_tags": [], "errors": [], "notices": [], "messages": [x["type"] for x in messages],
                  "revealed": reveal is not None}
    if all(x["type"] in _SERVER_LOGIN for x in messages):
        step["step"] = "login"
        step["server"] = next(((x.get("attributes") or {}).get("server_version") for x in messages), None)
        return step
    columns: list[m.Column] = []
    fresh = True
    for x in messages:
        kind = x["type"]
        attributes = x.get("attributes") or {}
        try:
            if kind == "ColumnDefinition":
                if fresh:
                    columns, fresh = [], False
                columns.append(_column(attributes))
                step["columns"] = [c.name for c in columns]
            elif kind in ("TextRow", "BinaryRow"):
                fresh = True
                data = reveal(x["sealed_original"]) if reveal is not None and x.get("sealed_original") else x["data"]
                for payload in _packets({"data": data}):
                    if step["row_count"] < max_rows:
                        if x.get("sealed_original") is not None:
                            step["masked_rows"].append(len(step["rows"]))
                        step["rows"].append(_row_text(payload, columns, kind == "BinaryRow"))
                    step["row_count"] += 1
            elif kind == "OK" and x.get("rows") is not None:
                step["command_tags"].append(f"OK, {x['rows']} row{'s' if x['rows'] != 1 else ''} affected")
            elif kind == "EOF" and x.get("command_tag"):
                fresh = True
                step["command_tags"].append(x["command_tag"])
            elif kind == "LocalInfileRequest":
                step["command_tags"].append(f"asks for the client's file {attributes.get('file')}")
            elif kind == "PrepareOK":
                step["command_tags"].append(f"prepared statement {attributes.get('statement_id')} "
                                            f"({attributes.get('params')} parameters)")
            elif kind == "ERR":
                step["errors"].append({"severity": "ERROR", "code": x.get("error_code"),
                                       "errno": attributes.get("errno"), "message": x.get("error_message")})
        except ProtocolViolation as error:
            step.setdefault("undecodable", []).append(f"{kind}: {error.message} ({byte_summary(x['data'])})")
    if step["errors"] and not step["command_tags"] and not step["row_count"]:
        step["step"] = "error"
    return step


_LOGIN_ANY = _LOGIN | _SERVER_LOGIN
_FILE = frozenset({"LocalInfileData", "LocalInfileEnd"})  # LOAD DATA LOCAL: the client's file
_BETWEEN = frozenset({"COM_STMT_RESET", "COM_STMT_SEND_LONG_DATA"})  # a driver's steps between PREPARE and EXECUTE


def _login(entries: list[Entry], start: Step | None, max_rows: int, reveal: Reveal | None) -> tuple[Step, int, list[Record]]:
    """The login step from the entries that begin the session: (step, entries used, server messages left over)."""
    client, server, used, rest, outcome = login_exchange(entries, _LOGIN_ANY | {"OK", "ERR"},
                                                         {"OK": "ok", "ERR": "failed"})
    response = next(((x.get("attributes") or {}) for x in client if x["type"] == "HandshakeResponse"), {})
    greeting = next(((x.get("attributes") or {}) for x in server if x["type"] == "Handshake"), {})
    errors = _server([x for x in server if x["type"] == "ERR"], max_rows, reveal)["errors"]
    identity = (start or {}).get("identity") or {}
    first = entries[0].step
    step: Step = {**{k: first[k] for k in ("seq", "ts", "offset_s") if k in first},
                  "step": "login", "direction": "both", "channel": None, "outcome": outcome,
                  "subject": identity.get("subject") if outcome == "ok" else None, "user": response.get("user"),
                  "database": response.get("database"), "client": response.get("attr.program_name")
                  or response.get("attr._client_name"), "server": greeting.get("server_version"),
                  "tls": any(x["type"] == "SSLRequest" for x in client), "errors": errors,
                  "messages": [x["type"] for x in client], "server_messages": [x["type"] for x in server]}
    return step, used, rest


def _answer(entries: list[Entry], i: int) -> tuple[list[Record], int]:
    """The server runs right after entry i-1, up to the next step that is not one: (messages, next index)."""
    server: list[Record] = []
    while i < len(entries) and _frames(entries[i], "server"):
        server += entries[i].messages or []
        i += 1
    return server, i


def _statement_id(records: list[Record], kind: str) -> str | None:
    return next(((x.get("attributes") or {}).get("statement_id") for x in records if x["type"] == kind), None)


def _folded(entries: list[Entry], i: int, max_rows: int, reveal: Reveal | None) -> tuple[Step, int] | None:
    """A prepared statement's PREPARE … first EXECUTE, or a lone EXECUTE, with its result: (step, next index)."""
    entry = entries[i]
    if not _frames(entry, "client"):
        return None
    types = _types(entry)
    if types == ["COM_STMT_PREPARE"]:
        prepare, j = _answer(entries, i + 1)
        statement_id = _statement_id(prepare, "PrepareOK")
        if statement_id is None:
            return None
        between: list[str] = []
        while j < len(entries) and _frames(entries[j], "client") and set(_types(entries[j])) <= _BETWEEN:
            between += _types(entries[j])
            _, j = _answer(entries, j + 1)
        if j >= len(entries) or not _frames(entries[j], "client") or _types(entries[j]) != ["COM_STMT_EXECUTE"]:
            return None
        if _statement_id(entries[j].messages or [], "COM_STMT_EXECUTE") != statement_id:
            return None
        execute, k = entries[j], j + 1
        prepared = next(x for x in prepare if x["type"] == "PrepareOK").get("attributes") or {}
        head = {"prepared": statement_id, "prepared_parameters": prepared.get("params"),
                "messages": ["COM_STMT_PREPARE", *between, "COM_STMT_EXECUTE"]}
    elif types == ["COM_STMT_EXECUTE"]:
        execute, k, head = entry, i + 1, {}
    else:
        return None
    statement = {**execute.step}
    if statement.get("step") != "statement":
        return None
    server, end = _answer(entries, k)
    if not server or not server[-1].get("outcome"):  # the answer did not end (a cursor, a cut session)
        return None
    result = _server(server, max_rows, reveal)
    result.pop("step")
    result["server_messages"] = result.pop("messages")
    return {**entry.step, **result, **{k: v for k, v in statement.items() if k not in ("seq", "ts", "offset_s")},
            **head, "direction": "both"}, end


def arrange(entries: list[Entry], max_rows: int, reveal: Reveal | None) -> list[Step]:
    out: list[Step] = []
    start = next((e.step for e in entries if e.step["step"] == "start"), None)
    logged_in = False
    i = 0
    while i < len(entries):
        entry = entries[i]
        if not logged_in and entry.messages is not None:
            logged_in = True
            if _types(entry)[:1] and _types(entry)[0] in _LOGIN_ANY:
                step, used, rest = _login(entries[i:], start, max_rows, reveal)
                out.append(step)
                i += used
                if rest:  # what the target sent after the login's OK, in the same read
                    out.append({**entries[i - 1].step, **_server(rest, max_rows, reveal)})
                continue
        step, i = _folded(entries, i, max_rows, reveal) or (entry.step, i + 1)
        out.append(step)
    return out


def _login_description(step: Step) -> Description:
    who = step["subject"] or step["user"] or "(no user)"
    where = f" to {step['database']}" if step.get("database") else ""
    client = f" with {step['client']}" if step.get("client") else ""
    notes = ", ".join(x for x in ("TLS" if step.get("tls") else "", f"server {step['server']}" if step.get("server")
                                  else "") if x)
    error = step["errors"][0] if step["errors"] else {}
    head = {"ok": f"ok as {who}{where}{client}",
            "failed": f"failed for user {who}: ERROR {error.get('errno')} ({error.get('code')}): {error.get('message')}",
            }.get(step["outcome"], f"by user {who}{where}{client}, not completed")
    return "LOGIN", head + (f" ({notes})" if notes else ""), []


def _statement_description(step: Step) -> Description:
    detail = ([f"parameters: {json.dumps(step['parameters'], ensure_ascii=False)}"] if step.get("parameters") else [])
    if step.get("redacted"):
        kinds = ", ".join(step["redacted"])
        detail.append(f"[revealed] {kinds}: as the client sent it" if step.get("revealed")
                      else f"[redacted] {kinds}: the original is sealed to the custodian key")
    if "command_tags" not in step:
        return "SQL", ("PREPARE " if step.get("prepared") is True else "") + step["statement"], detail
    if step.get("prepared_parameters") is not None:
        n = step["prepared_parameters"]
        detail.insert(0, f"prepared as statement {step['prepared']} ({n} parameter{'' if n == '1' else 's'}), executed")
    errors = [f"ERROR {e['errno']} ({e['code']}): {e['message']}" for e in step["errors"]]
    outcome = ", ".join(step["command_tags"]) or (errors.pop(0) if errors else "")
    failed = step["errors"] and not step["command_tags"]
    return ("ERROR" if failed else "SQL"), step["statement"], detail + ([f"→ {outcome}"] if outcome else []) + errors


class MysqlRenderer:
    protocol = "mysql"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        return _client(messages, reveal) if direction == "client" else _server(messages, max_rows, reveal)

    def arrange(self, entries: list[Entry], *, max_rows: int, reveal: Reveal | None) -> list[Step]:
        return arrange(entries, max_rows, reveal)

    def describe(self, step: Step) -> Description | None:
        kind = step["step"]
        if kind == "statement":
            return _statement_description(step)
        if kind == "login" and step.get("direction") == "both":
            return _login_description(step)
        if kind == "login":
            if step.get("server") is not None or step.get("user") is None:
                return "LOGIN", " ".join(step["messages"]) + (f" ({step['server']})" if step.get("server") else ""), []
            where = f" to {step['database']}" if step.get("database") else ""
            return "LOGIN", f"{step['user']}{where}" + (f" with {step['client']}" if step.get("client") else ""), []
        if kind == "client":
            return "CLIENT", " ".join(step["messages"]), []
        if kind == "file":
            if step["refused"]:
                return "FILE", "none sent: the policy refused the file (the target got an empty one)", []
            done = (f", {int(step['total_bytes']):,} B in all, sha256 {step['sha256']}" if step["complete"]
                    else ", more follows")
            return "FILE", f"{step['bytes']:,} B of the client's file{done}", []
        if kind in ("result", "error"):
            tags = ", ".join(step["command_tags"])
            errors = [f"ERROR {e['errno']} ({e['code']}): {e['message']}" for e in step["errors"]]
            head = tags or (errors.pop(0) if errors else " ".join(step["messages"]))
            return ("ERROR" if kind == "error" else "RESULT"), head, errors + [
                f"undecodable {line}" for line in step.get("undecodable", [])]
        return None


RENDERER = MysqlRenderer()

"""How a recorded MySQL session looks in a replay (see ingest/protocols/render.py).

Client runs become a `statement` step (COM_QUERY's SQL; COM_STMT_EXECUTE's
prepared SQL with its bound values; COM_STMT_PREPARE's SQL marked prepared),
a `login` step (the handshake response: user, schema, client; never the
token, which was not recorded), or a `client` step listing the commands.
Server runs become a `result` step: columns, the first rows exactly as the
client saw them (text rows, and binary rows decoded by their column types),
OK counts, errors; an `error` step when an error is all there is.
"""

from __future__ import annotations

import json

from ..render import Description, Record, Reveal, Step, byte_summary
from . import messages as m
from .packets import PacketReader, ProtocolViolation

_TYPE_CODES = {name: code for code, name in m.TYPE_NAMES.items()}
_LOGIN = frozenset({"HandshakeResponse", "AuthSwitchResponse", "SSLRequest"})
_SERVER_LOGIN = frozenset({"Handshake", "AuthSwitchRequest"})


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


class MysqlRenderer:
    protocol = "mysql"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        return _client(messages, reveal) if direction == "client" else _server(messages, max_rows, reveal)

    def describe(self, step: Step) -> Description | None:
        kind = step["step"]
        if kind == "statement":
            detail = ([f"parameters: {json.dumps(step['parameters'], ensure_ascii=False)}"]
                      if step.get("parameters") else [])
            if step.get("redacted"):
                kinds = ", ".join(step["redacted"])
                detail.append(f"[revealed] {kinds}: as the client sent it" if step.get("revealed")
                              else f"[redacted] {kinds}: the original is sealed to the custodian key")
            return "SQL", ("PREPARE " if step.get("prepared") else "") + step["statement"], detail
        if kind == "login":
            if step.get("server") is not None or step.get("user") is None:
                return "LOGIN", " ".join(step["messages"]) + (f" ({step['server']})" if step.get("server") else ""), []
            where = f" to {step['database']}" if step.get("database") else ""
            return "LOGIN", f"{step['user']}{where}" + (f" with {step['client']}" if step.get("client") else ""), []
        if kind == "client":
            return "CLIENT", " ".join(step["messages"]), []
        if kind in ("result", "error"):
            tags = ", ".join(step["command_tags"])
            errors = [f"ERROR {e['errno']} ({e['code']}): {e['message']}" for e in step["errors"]]
            head = tags or (errors.pop(0) if errors else " ".join(step["messages"]))
            return ("ERROR" if kind == "error" else "RESULT"), head, errors + [
                f"undecodable {line}" for line in step.get("undecodable", [])]
        return None


RENDERER = MysqlRenderer()

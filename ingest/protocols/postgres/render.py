"""How a recorded PostgreSQL session looks in a replay (see ingest/protocols/render.py).

Client runs become a `statement` step (the SQL of a Query, or of Parse + Bind,
with its parameters) or, without one, a `client` step listing the message
types. Server runs become a `result` step: columns, the first rows exactly as
the client saw them (read from the relayed, masked when masked, DataRow
bytes; a record may hold a run of rows of one read), command tags, errors,
notices, transaction status; an `error` step when an error is all there is.
Errors and notices use the fields the recorder already decoded.
"""

from __future__ import annotations

import json
from typing import Any

from ..render import Description, Record, Reveal, Step, byte_summary
from . import messages as m
from .protocol import ProtocolViolation
from .records import split_run


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _client(messages: list[Record]) -> Step:
    """What the client sent: the statement (Query, or Parse + Bind) with its parameters, or just message types."""
    statement = next((x["statement"] for x in messages if x.get("statement") is not None), None)
    parameters = next((x["parameters"] for x in messages if x.get("parameters") is not None), None)
    step: Step = {"step": "statement" if statement is not None or parameters is not None else "client",
                  "messages": [x["type"] for x in messages]}
    if step["step"] == "statement":
        step.update(statement=statement, parameters=parameters)
    return step


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


class PostgresRenderer:
    protocol = "postgres"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        return _client(messages) if direction == "client" else _server(messages, max_rows, reveal)

    def describe(self, step: Step) -> Description | None:
        kind = step["step"]
        if kind == "statement":
            params = ([f"parameters: {json.dumps(step['parameters'], ensure_ascii=False)}"]
                      if step["parameters"] else [])
            return "SQL", step["statement"] if step["statement"] is not None else "(prepared statement)", params
        if kind == "client":
            return "CLIENT", " ".join(step["messages"]), []
        if kind in ("result", "error"):
            head, body = _result(step)
            return ("ERROR" if kind == "error" else "RESULT"), head, body
        return None


RENDERER = PostgresRenderer()

"""What the recorder keeps of each message besides its bytes.

`summarize` fills the decoded fields of the event contract's `Message`
record (schemas/event.avsc); the caller adds `data` and `sealed_original`.
Secrets are never summarized: the password message carries the client's
token and a cancel key authorizes cancels, so only their bytes (which the
caller may seal or drop) hold them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from . import messages as m
from .protocol import Message

Fields = dict[str, Any]


def summarize(message: Message) -> Fields:
    """The recording fields of one message: type, statement, parameters,
    command_tag, rows, error_code, error_message, attributes (None or {}
    when absent). The message type already says which direction it came
    from, so no direction is needed. Raises ProtocolViolation on a body that
    does not decode.
    """
    record: Fields = {
        "type": message.type,
        "statement": None,
        "parameters": None,
        "command_tag": None,
        "rows": None,
        "error_code": None,
        "error_message": None,
        "attributes": {},
    }
    summarizer = _SUMMARIZERS.get(message.type)
    if summarizer is not None:
        record.update(summarizer(message.payload))
    return record


def _json(items: Any) -> str:
    """List-valued attributes, as JSON text: the attribute map holds strings."""
    return json.dumps(list(items), ensure_ascii=False)


def _startup(payload: bytes) -> Fields:
    startup = m.decode_startup_message(payload)
    major, minor = startup.protocol_version
    return {"attributes": {**startup.parameters, "protocol_version": f"{major}.{minor}"}}


def _cancel(payload: bytes) -> Fields:
    return {"attributes": {"process_id": str(m.decode_cancel_request(payload).process_id)}}


def _query(payload: bytes) -> Fields:
    return {"statement": m.decode_query(payload).sql}


def _parse(payload: bytes) -> Fields:
    parse = m.decode_parse(payload)
    attributes = {"statement_name": parse.name}
    if parse.parameter_type_oids:
        attributes["parameter_type_oids"] = _json(parse.parameter_type_oids)
    return {"statement": parse.sql, "attributes": attributes}


def _bind(payload: bytes) -> Fields:
    bind = m.decode_bind(payload)
    return {
        "parameters": list(bind.parameters),
        "attributes": {"portal": bind.portal, "statement_name": bind.statement},
    }


def _execute(payload: bytes) -> Fields:
    execute = m.decode_execute(payload)
    return {"attributes": {"portal": execute.portal, "max_rows": str(execute.max_rows)}}


def _statement_or_portal(decode: Callable[[bytes], m.StatementOrPortal]) -> Callable[[bytes], Fields]:
    def summarize_target(payload: bytes) -> Fields:
        target = decode(payload)
        return {"attributes": {"kind": target.kind, "name": target.name}}

    return summarize_target


def _function_call(payload: bytes) -> Fields:
    call = m.decode_function_call(payload)
    return {"parameters": list(call.arguments), "attributes": {"function_oid": str(call.function_oid)}}


def _copy_fail(payload: bytes) -> Fields:
    return {"error_message": m.decode_copy_fail(payload).message}


def _authentication(payload: bytes) -> Fields:
    request = m.decode_authentication(payload)
    attributes = {"method": request.method}
    if request.mechanisms:
        attributes["mechanisms"] = _json(request.mechanisms)
    return {"attributes": attributes}


def _backend_key_data(payload: bytes) -> Fields:
    return {"attributes": {"process_id": str(m.decode_backend_key_data(payload).process_id)}}


def _parameter_status(payload: bytes) -> Fields:
    status = m.decode_parameter_status(payload)
    return {"attributes": {"name": status.name, "value": status.value}}


def _ready_for_query(payload: bytes) -> Fields:
    return {"attributes": {"transaction_status": m.decode_ready_for_query(payload).status}}


def _command_complete(payload: bytes) -> Fields:
    complete = m.decode_command_complete(payload)
    return {"command_tag": complete.tag, "rows": complete.rows}


def _row_description(payload: bytes) -> Fields:
    fields = m.decode_row_description(payload).fields
    return {
        "attributes": {
            "columns": _json(f.name for f in fields),
            "type_oids": _json(f.type_oid for f in fields),
        }
    }


def _error(payload: bytes) -> Fields:
    error = m.decode_error_response(payload)
    rest = {k: v for k, v in error.fields.items() if k not in ("code", "message")}
    return {
        "error_code": error.fields.get("code"),
        "error_message": error.fields.get("message"),
        "attributes": rest,
    }


def _notice(payload: bytes) -> Fields:
    return {"attributes": m.decode_notice_response(payload).fields}


def _notification(payload: bytes) -> Fields:
    note = m.decode_notification_response(payload)
    return {
        "attributes": {
            "process_id": str(note.process_id),
            "channel": note.channel,
            "payload": note.payload,
        }
    }


def _copy_response(payload: bytes) -> Fields:
    copy = m.decode_copy_response(payload)
    return {"attributes": {"format": str(copy.format), "column_formats": _json(copy.column_formats)}}


def _parameter_description(payload: bytes) -> Fields:
    return {"attributes": {"type_oids": _json(m.decode_parameter_description(payload).type_oids)}}


def _negotiate(payload: bytes) -> Fields:
    negotiation = m.decode_negotiate_protocol_version(payload)
    return {
        "attributes": {
            "newest_minor": str(negotiation.newest_minor),
            "unrecognized_options": _json(negotiation.unrecognized_options),
        }
    }


# Message types absent here (DataRow, CopyData, Sync, PasswordMessage...)
# have nothing to record beyond their bytes, or must not be recorded.
_SUMMARIZERS: dict[str, Callable[[bytes], Fields]] = {
    "StartupMessage": _startup,
    "CancelRequest": _cancel,
    "Query": _query,
    "Parse": _parse,
    "Bind": _bind,
    "Execute": _execute,
    "Describe": _statement_or_portal(m.decode_describe),
    "Close": _statement_or_portal(m.decode_close),
    "FunctionCall": _function_call,
    "CopyFail": _copy_fail,
    "AuthenticationRequest": _authentication,
    "BackendKeyData": _backend_key_data,
    "ParameterStatus": _parameter_status,
    "ReadyForQuery": _ready_for_query,
    "CommandComplete": _command_complete,
    "RowDescription": _row_description,
    "ErrorResponse": _error,
    "NoticeResponse": _notice,
    "NotificationResponse": _notification,
    "CopyInResponse": _copy_response,
    "CopyOutResponse": _copy_response,
    "CopyBothResponse": _copy_response,
    "ParameterDescription": _parameter_description,
    "NegotiateProtocolVersion": _negotiate,
}

SUMMARIZED_TYPES: frozenset[str] = frozenset(_SUMMARIZERS)
"""Message types with decoded fields; for any other type `summarize` adds nothing
to the type and bytes, so a recorder may skip calling it."""

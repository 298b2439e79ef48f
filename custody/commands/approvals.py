"""`custody approvals list|approve|deny`: reviewers act on held statements with their own token.

The CLI checks what it can (the token is valid, the reviewer is not the
requester and is in an approver group) so that a mistake is reported at once,
but the proxy holding the statement checks all of it again: it is the
enforcement point, and anyone can write to the topic.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import click
from kafka import TopicPartition

from custody.config import Config, config_option, load_config
from ingest.errors import CustodyError
from ingest.kafka import consumer, ensure_topics, producer
from ingest.keys import Keyring
from proxy.approvals import (
    ApprovalError,
    ApprovalRequest,
    Ledger,
    check_reviewer,
    decision_document,
    decode,
    encode,
    parse_time,
)
from proxy.approvals_gateway import TOPIC
from proxy.identity import AuthenticationError

READ_TIMEOUT = 10.0


def read_approvals(config: Config) -> Ledger:
    """Every request and decision on the topic so far (read to the end offsets taken now)."""
    ensure_topics(config.kafka, (TOPIC,))
    topic = config.kafka.topic(TOPIC)
    reader = consumer(config.kafka, group_id=None, isolation_level="read_uncommitted")
    ledger = Ledger()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        reader.assign(partitions)
        reader.seek_to_beginning(*partitions)
        ends = reader.end_offsets(partitions)
        deadline = time.monotonic() + READ_TIMEOUT
        while any(reader.position(p) < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                raise CustodyError(f"{topic}: could not read to the end within {READ_TIMEOUT:g} s")
            for batch in reader.poll(timeout_ms=200).values():
                for record in batch:
                    try:
                        ledger.add(decode(record.value))
                    except ApprovalError:
                        continue  # the topic is shared: skip what is not ours
    finally:
        reader.close()
    return ledger


token_option = click.option("--token", envvar="CUSTODY_TOKEN", required=True,
                            help="Your own OIDC access token (default: $CUSTODY_TOKEN).")
reason_option = click.option("--reason", required=True, help="Why; recorded with the decision in the session's evidence.")


@click.group("approvals")
def approvals_group() -> None:
    """Operations held for approval (statements, commands, requests): list, approve or deny them."""


@approvals_group.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Also decided and expired requests.")
def list_command(config_path: str | None, show_all: bool) -> None:
    """Pending requests (no decision yet, not expired), oldest first."""
    ledger = read_approvals(load_config(config_path))
    requests = list(ledger.requests.values()) if show_all else ledger.pending()
    if not requests:
        click.echo("no pending approval requests" if not show_all else "no approval requests")
        return
    for request in requests:
        click.echo(_describe(request, ledger))


def _describe(request: ApprovalRequest, ledger: Ledger) -> str:
    decided = ledger.decisions.get(request.request_id)
    if decided is not None:
        state = f"{decided.decision} by {(decided.approver or {}).get('subject', '?')}: {decided.reason}"
    elif parse_time(request.expires_at) <= datetime.now(timezone.utc):
        state = "expired"
    else:
        state = f"pending until {request.expires_at}"
    return "\n".join([
        f"{request.request_id}  {state}",
        f"  requester: {request.requester.get('subject')}  target: {request.target}  rule: {request.rule}",
        f"  approvers: {', '.join(request.approvers)}  held since {request.created_at}",
        f"  statement: {request.statement}",
    ])


def _decide(config_path: str | None, request_id: str, decision: str, reason: str, token: str) -> None:
    from proxy.server import token_verifier

    config = load_config(config_path)
    ledger = read_approvals(config)
    request = ledger.requests.get(request_id)
    if request is None:
        raise CustodyError(f"no approval request {request_id} on {config.kafka.topic(TOPIC)}")
    if request_id in ledger.decisions:
        raise CustodyError(f"request {request_id} is already decided: {ledger.decisions[request_id].decision}")
    if parse_time(request.expires_at) <= datetime.now(timezone.utc):
        raise CustodyError(f"request {request_id} expired at {request.expires_at}: it was denied")
    try:
        reviewer = token_verifier(config).verify(token)
    except AuthenticationError as exc:
        raise CustodyError(f"your token was refused: {exc}") from None
    try:
        check_reviewer(request, reviewer.subject, reviewer.groups)
    except ApprovalError as exc:
        raise CustodyError(str(exc)) from None
    proxy_key = Keyring.load(config.keys.keyring).get(request.proxy_key_id)
    if proxy_key.role != "proxy":
        raise CustodyError(f"request {request_id} names key {request.proxy_key_id}, which is not a proxy key")
    document = decision_document(request, decision, reason, token, reviewer.to_avro(), proxy_key.verify_key)
    sender = producer(config.kafka)
    try:
        sender.send(config.kafka.topic(TOPIC), key=request_id.encode(), value=encode(document.document())).get(timeout=10)
    finally:
        sender.close(5)
    click.echo(f"{'approved' if decision == 'approve' else 'denied'} {request_id}: {request.statement}")


@approvals_group.command("approve")
@click.argument("request_id")
@reason_option
@token_option
@config_option
def approve_command(request_id: str, reason: str, token: str, config_path: str | None) -> None:
    """Let the held operation REQUEST_ID run."""
    _decide(config_path, request_id, "approve", reason, token)


@approvals_group.command("deny")
@click.argument("request_id")
@reason_option
@token_option
@config_option
def deny_command(request_id: str, reason: str, token: str, config_path: str | None) -> None:
    """Refuse the held operation REQUEST_ID: the client gets its protocol's refusal (42501 on PostgreSQL)."""
    _decide(config_path, request_id, "deny", reason, token)


commands: list[click.Command] = [approvals_group]

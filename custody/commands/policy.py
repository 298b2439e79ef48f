"""`custody policy test`: what the policy would do with an operation, and why, without a proxy."""

from __future__ import annotations

import click

from proxy.policy.operation import OPERATION_KINDS, PROTOCOLS, Operation
from proxy.policy.rules import Decision, Policy
from proxy.policy.sql import StatementInfo

DEFAULT_KINDS = {"postgres": "statement", "mysql": "statement", "ssh": "command", "http": "request",
                 "kubernetes": "request"}
"""The kind `--kind` defaults to per protocol."""


@click.group("policy")
def policy_group() -> None:
    """Check and try out policy files."""


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "-"


def _statement_lines(statement: StatementInfo, depth: int = 1) -> list[str]:
    where = "" if statement.has_where is None else f"  where={'yes' if statement.has_where else 'no'}"
    lines = [
        f"{'  ' * depth}{statement.kind}: {statement.normalized}",
        f"{'  ' * depth}  tables={_names(statement.tables)}  functions={_names(statement.functions)}{where}",
    ]
    for child in statement.nested:
        lines.extend(_statement_lines(child, depth + 1))
    return lines


def _operation_lines(operation: Operation, indent: str = "") -> list[str]:
    attributes = ", ".join(f"{k}={v}" for k, v in operation.attributes.items())
    return [
        f"{indent}operation: {operation.protocol} {operation.kind}: {operation.text}",
        f"{indent}  objects={_names(operation.objects)}  attributes={attributes or '-'}",
    ]


def render(decision: Decision, why: tuple[str, ...] = ()) -> str:
    """The decision, the rule behind it and why it matched, and the analysis, as the command prints them."""
    lines = [
        f"decision: {decision.action}",
        f"rule: {decision.rule or '(no rule matched)'}",
    ]
    if decision.message:
        lines.append(f"message: {decision.message}")
    if decision.approvers:
        lines.append(f"approvers: {_names(decision.approvers)}")
    lines.extend(f"why: {line}" for line in why)
    if decision.matched is not None:
        lines.append(f"matched statement: {decision.matched.kind}: {decision.matched.normalized}")
    elif decision.part is not None and decision.part.operation is not None:
        lines.extend(_operation_lines(decision.part.operation, "matched "))
    if decision.operation is not None:
        lines.extend(_operation_lines(decision.operation))
    if decision.statements:
        lines.append("statements:")
        for statement in decision.statements:
            lines.extend(_statement_lines(statement))
    return "\n".join(lines)


def explain(policy: Policy, decision: Decision, subject: str, groups: tuple[str, ...], target: str) -> tuple[str, ...]:
    """Why the deciding rule matched, or why no rule did."""
    if decision.rule == "on_parse_error":
        return ("the analyzer could not read the text: the policy's on_parse_error applies",)
    rule = next((r for r in policy.rules if r.name == decision.rule), None)
    if rule is None or decision.operation is None:
        return ("no rule matched: allowed (and recorded)",)
    part = decision.part
    operation = part.operation if part is not None and part.operation is not None else decision.operation
    return rule.explain(subject, groups, target, operation, decision.matched)


def _attributes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for value in values:
        name, equals, setting = value.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"expected name=value, got {value!r}", ctx, param)
        found[name] = setting
    return found


@policy_group.command("test")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False), help="Policy file (TOML).")
@click.option("--identity", "subject", required=True, help="Caller subject, as the identity provider names it.")
@click.option("--group", "groups", multiple=True, help="A group of the caller (repeat for several).")
@click.option("--target", required=True, help="Proxy target name, as in [[proxy]] name.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="postgres", show_default=True,
              help="Protocol of the operation.")
@click.option("--kind", type=click.Choice(OPERATION_KINDS),
              help="Kind of operation [default: statement for SQL, command for ssh, request for http/kubernetes].")
@click.option("--object", "objects", multiple=True, help="An object the operation touches: table, path, resource "
              "(repeat for several).")
@click.option("--attribute", "attributes", multiple=True, callback=_attributes, metavar="NAME=VALUE",
              help="A protocol fact such as verb=delete or database=prod (repeat for several).")
@click.argument("text", metavar="TEXT")
def test_command(policy_path: str, subject: str, groups: tuple[str, ...], target: str, protocol: str,
                 kind: str | None, objects: tuple[str, ...], attributes: dict[str, str], text: str) -> None:
    """Print the decision on TEXT (SQL, a command line, "DELETE /api/v1/…") sent by an identity to a target:
    the rule that made it, why it matched, and the analysis."""
    policy = Policy.load(policy_path)
    operation = Operation(protocol, kind or DEFAULT_KINDS[protocol], text, objects, attributes)
    decision = policy.decide(subject, groups, target, operation)
    click.echo(render(decision, explain(policy, decision, subject, groups, target)))
    plan = policy.masking_for(subject, groups, target)
    click.echo(f"masking: {_names(plan.rules) if plan else 'none'}")


commands: list[click.Command] = [policy_group]

"""`custody policy test`: what the policy would do with a statement, and why, without a proxy."""

from __future__ import annotations

import click

from proxy.policy.rules import Decision, Policy
from proxy.policy.sql import StatementInfo


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


def render(decision: Decision) -> str:
    """The decision, the rule behind it and the per-statement analysis, as the command prints them."""
    lines = [
        f"decision: {decision.action}",
        f"rule: {decision.rule or '(no rule matched)'}",
    ]
    if decision.message:
        lines.append(f"message: {decision.message}")
    if decision.approvers:
        lines.append(f"approvers: {_names(decision.approvers)}")
    if decision.matched is not None:
        lines.append(f"matched statement: {decision.matched.kind}: {decision.matched.normalized}")
    lines.append("statements:")
    for statement in decision.statements:
        lines.extend(_statement_lines(statement))
    return "\n".join(lines)


@policy_group.command("test")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False), help="Policy file (TOML).")
@click.option("--identity", "subject", required=True, help="Caller subject, as the identity provider names it.")
@click.option("--group", "groups", multiple=True, help="A group of the caller (repeat for several).")
@click.option("--target", required=True, help="Proxy target name, as in [[proxy]] name.")
@click.argument("sql")
def test_command(policy_path: str, subject: str, groups: tuple[str, ...], target: str, sql: str) -> None:
    """Print the decision for SQL sent by an identity to a target, the rule that made it, and the analysis."""
    policy = Policy.load(policy_path)
    click.echo(render(policy.decide(subject, groups, target, sql)))
    plan = policy.masking_for(subject, groups, target)
    click.echo(f"masking: {_names(plan.rules) if plan else 'none'}")


commands: list[click.Command] = [policy_group]

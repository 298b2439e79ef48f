"""Decisions by numeric shape (BoundPolicy): statements that differ in their numbers only are decided once per
shape, and get exactly the decision, operation, parts and texts deciding each on its own gives; where the numbers
can change the outcome (a `text` rule, input redaction's detectors) they are read every time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from proxy.policy import analyzers, sql
from proxy.policy.detectors import scanner_for
from proxy.policy.operation import Operation
from proxy.policy.rules import Policy
from proxy.postgres.redaction import find_secrets

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "proxy" / "policies" / "default.toml"

TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {};",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP);",
    "UPDATE orders SET total = {} WHERE {} = {}",  # no WHERE that filters: held
    "DELETE FROM t1 WHERE id = {} AND note = 'row 7'",
    "WITH gone AS (DELETE FROM t WHERE {} = {} RETURNING *) INSERT INTO archive SELECT * FROM gone LIMIT {}",
    "select * from \"T 2\" where x = {} or y in (select pg_terminate_backend({}))",
    "SELECT lo_export({}, '/tmp/x'), 1.5e{} FROM t",
]

POLICY = """
[[rule]]
name = "hold-terminate"
action = "hold"
approvers = ["dba"]
functions = ["pg_terminate_backend"]

[[rule]]
name = "block-archive-in-prod"
action = "block"
tables = ["archive"]
attributes = { database = ["prod"] }

[[rule]]
name = "hold-unfiltered"
action = "hold"
approvers = ["dba"]
statements = ["update", "delete"]
without_where = true
"""

TEXT_RULE = """
[[rule]]
name = "block-account-4242"
action = "block"
text = "aid = 4242\\\\b"
"""


def statement(text: str, database: str | None = None) -> Operation:
    return Operation("postgres", "statement", text, attributes={"database": database} if database else {})


def fresh(policy: Policy, operation: Operation):
    """The decision on the operation alone: no shape, no decision seen before."""
    return policy.bind("alice", ("dev",), "pg")._decide(operation)


@pytest.mark.parametrize("source", [DEFAULT_POLICY.read_text(), POLICY])
@settings(max_examples=300, deadline=None)
@given(template=st.sampled_from(TEMPLATES), numbers=st.lists(st.integers(0, 10**12), min_size=4, max_size=4),
       database=st.sampled_from([None, "prod", "dev"]))
def test_a_decision_by_shape_is_the_decision_on_the_statement_itself(source, template, numbers, database):
    policy = Policy.from_toml(source)
    bound = policy.bind("alice", ("dev",), "pg")
    bound.decide(statement(template.format(*[n + 1 for n in numbers]), database))  # its shape is known now
    operation = statement(template.format(*numbers), database)
    decision = bound.decide(operation)
    assert decision == fresh(policy, operation)
    assert decision.operation is operation
    assert all(p.statement.text == sql._own_text(operation.text) for p in decision.parts)
    assert decision.part is None or decision.part in decision.parts
    assert decision.matched == fresh(policy, operation).matched
    assert hash(decision) == hash(fresh(policy, operation))


def test_statements_of_one_shape_are_decided_once():
    bound = Policy.from_toml(POLICY).bind("alice", ("dev",), "pg")
    for aid in range(1, 50):
        decision = bound.decide(statement(f"UPDATE orders SET total = {aid} WHERE 1 = 1"))
        assert (decision.action, decision.rule) == ("hold", "hold-unfiltered")
        assert decision.matched.text == f"UPDATE orders SET total = {aid} WHERE 1 = 1"
    assert len(bound._shapes) == 1


def test_the_attributes_are_read_for_every_statement_of_a_shape():
    bound = Policy.from_toml(POLICY).bind("alice", ("dev",), "pg")
    text = "WITH gone AS (DELETE FROM t WHERE id = {} RETURNING *) INSERT INTO archive SELECT * FROM gone"
    assert bound.decide(statement(text.format(1), "dev")).action == "allow"
    assert bound.decide(statement(text.format(2), "prod")).rule == "block-archive-in-prod"
    assert bound.decide(statement(text.format(3), "dev")).action == "allow"


def test_a_text_rule_reads_the_numbers_of_every_statement():
    """`text` may match the very number: such a binding decides each statement on its own text."""
    bound = Policy.from_toml(TEXT_RULE).bind("alice", ("dev",), "pg")
    assert not bound._by_shape
    seen = [bound.decide(statement(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}")).action
            for aid in (4241, 4242, 4243, 42420, 4242)]
    assert seen == ["allow", "block", "allow", "allow", "block"]
    assert not bound._shapes


def test_a_text_rule_for_someone_else_leaves_the_shape_cache_on():
    source = TEXT_RULE.replace('action = "block"', 'action = "block"\nsubjects = ["mallory"]')
    policy = Policy.from_toml(source)
    assert policy.bind("alice", (), "pg")._by_shape
    mallory = policy.bind("mallory", (), "pg")
    assert not mallory._by_shape
    assert mallory.decide(statement("SELECT 1 FROM a WHERE aid = 4242")).action == "block"


@pytest.mark.parametrize("text", [
    "SELECT 1; DROP TABLE t",  # two statements: no shape, decided as a whole
    "DROP TABLE t2",  # not plain DML
    "SELECT * FROM t WHERE x = $1",
    "SELECT * FROM WHERE x = 1",  # does not parse: on_parse_error, with its own error
])
def test_what_has_no_shape_is_decided_on_its_own(text):
    policy = Policy.load(DEFAULT_POLICY)
    operation = statement(text)
    assert analyzers.shape(operation) is None
    assert policy.bind("alice", ("dev",), "pg").decide(operation) == fresh(policy, operation)


def test_only_the_postgres_analyzer_has_shapes(monkeypatch):
    assert analyzers.shape(Operation("mysql", "statement", "SELECT * FROM t WHERE id = 5")) is None
    monkeypatch.setitem(analyzers.ANALYZERS, "postgres", lambda operation: ())
    assert analyzers.shape(statement("SELECT * FROM t WHERE id = 5")) is None


@pytest.mark.parametrize("card", ["4111111111111111", "'4111 1111 1111 1111'", "'4111111111111111'"])
def test_a_card_number_literal_is_redacted_after_its_shape_was_seen_clean(card):
    """Input redaction reads each statement's own numbers: a card number written where pgbench writes an id."""
    detectors = scanner_for(frozenset({"credit_card", "phone", "us_ssn"}))
    for aid in (1, 12345, 734521):
        clean = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        assert find_secrets(clean, detectors) == (clean, (), frozenset())
        statement_ = clean.replace(str(aid), card)
        redacted, kinds, _ = find_secrets(statement_, detectors)
        assert kinds == ("credit_card",) and "4111" not in redacted


def test_the_number_pattern_finds_what_the_look_behind_first_pattern_found():
    """_NUMBER's look-behind after its first digit is the same test as one before it, and faster."""
    import random
    import re

    reference = re.compile(r"""(?<![\w$.'"])[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?(?![\w.'"])""")
    rng = random.Random(11)
    alphabet = "0123456789aeE.+-$'\" _x\u00e9\u0663;,()"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert sql._NUMBER.sub("0", text) == reference.sub("0", text), text

"""MySQL statements through sqlglot's MySQL dialect: the default policy's rules mean the same as for
PostgreSQL, and the evasions MySQL offers (executable comments, quoting, multi-statements, PREPARE FROM,
stored programs, REPLACE, LOAD DATA) are seen or refused."""

from __future__ import annotations

from importlib import resources

import pytest

from proxy.policy import Operation, Policy
from proxy.policy.mysql_sql import analyze_mysql, executable_comments


@pytest.fixture(scope="module")
def policy() -> Policy:
    text = resources.files("proxy").joinpath("policies/default.toml").read_text()
    return Policy.from_toml(text, "default.toml")


def decide(policy: Policy, sql: str):
    return policy.decide("eve@example.com", ("dev",), "local-mysql", Operation("mysql", "statement", sql))


@pytest.mark.parametrize("sql, rule", [
    ("DROP TABLE people", "block-drop"),
    ("dRoP/**/TaBlE `people`", "block-drop"),
    ("DROP DATABASE shop", "block-drop"),
    ("DROP SCHEMA shop", "block-drop"),
    ("/*!50000 DROP TABLE people */", "block-drop"),
    ("SELECT 1 /*M!100000 ; TRUNCATE people */", "block-truncate"),
    ("SELECT 1; DROP TABLE people", "block-drop"),
    ("PREPARE s FROM 'DROP TABLE people'", "block-drop"),
    ("TRUNCATE TABLE people", "block-truncate"),
    ("DELETE FROM people", "hold-unfiltered-writes"),
    ("DELETE FROM people WHERE 1 = 1", "hold-unfiltered-writes"),
    ("UPDATE people SET name = 'x'", "hold-unfiltered-writes"),
    ("GRANT ALL ON *.* TO 'u'@'%'", "hold-privilege-changes"),
    ("PREPARE s FROM @sql", "hold-dynamic-sql"),
    ("CREATE PROCEDURE p() BEGIN SELECT 1; END", "hold-dynamic-sql"),
    ("SELECT 1; SELECT (", "on_parse_error"),
])
def test_default_rules_mean_the_same_for_mysql(policy, sql, rule):
    decision = decide(policy, sql)
    assert decision.action in ("block", "hold") and decision.rule == rule, (sql, decision)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM people WHERE id = 1",
    "SELECT '/*!50000 DROP TABLE people */'",
    "SELECT 'DROP TABLE people'",
    "UPDATE people SET name = 'x' WHERE id = 2",
    "DELETE FROM people WHERE id = 3",
    "INSERT INTO people (id) VALUES (1)",
    "REPLACE INTO people (id) VALUES (1)",
    "SET NAMES utf8mb4",
    "SHOW TABLES",
    "-- just a comment\nSELECT 1",
])
def test_harmless_statements_are_allowed(policy, sql):
    assert decide(policy, sql).action == "allow", sql


def test_statement_kinds_tables_and_filters():
    (delete,) = analyze_mysql("DELETE FROM shop.orders WHERE created < now()")
    assert (delete.kind, delete.tables, delete.has_where) == ("delete", ("shop.orders",), True)
    (load,) = analyze_mysql("LOAD DATA LOCAL INFILE '/tmp/x.csv' INTO TABLE people")
    assert (load.kind, load.tables) == ("copy", ("people",))
    (server_file,) = analyze_mysql("LOAD DATA INFILE '/etc/passwd' INTO TABLE people")
    assert server_file.kind == "copy_file"
    (replace,) = analyze_mysql("REPLACE INTO people VALUES (1)")
    assert (replace.kind, replace.tables) == ("insert", ("people",))
    (select,) = analyze_mysql("SELECT LOAD_FILE('/etc/passwd')")
    assert "load_file" in select.functions


def test_executable_comments_are_sql_other_comments_and_literals_are_not():
    assert executable_comments("SELECT 1 /*!40101 , 2 */").split() == ["SELECT", "1", ",", "2"]
    assert executable_comments("SELECT '/*!1 x*/' /* c */") == "SELECT '/*!1 x*/' /* c */"

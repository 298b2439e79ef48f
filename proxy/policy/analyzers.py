"""Per-protocol analyzers: what an operation's text means, in the units policy decides one by one.

An analyzer is a function `(Operation) -> Sequence[Part]`, registered in
`ANALYZERS` under its protocol name; adding a protocol is that function plus
one line there. Each `Part` is decided on its own by the rules (first match),
and the operation gets the strictest result — so an analyzer that finds a
DELETE inside a CTE, or `rm -rf` inside `sh -c '…'`, reports it as a part of
its own. A part may carry the SQL analysis of one statement (which the
`statements`, `tables`, `functions` and `without_where` matchers read) and
may narrow the operation's fields (its own text, objects, attributes) for
the other matchers; by default it is matched with the whole operation's.

An analyzer raises `AnalysisError` for text it cannot read (the policy's
`on_parse_error` applies), and may return no parts (nothing to analyze, e.g.
an empty query): the operation is then decided on its own fields, as for a
protocol with no analyzer at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .operation import Operation
from .sql import _CACHE_MAX_TEXT, StatementInfo, analyze

__all__ = ["ANALYZERS", "Analyzer", "Part", "parts", "postgres"]


@dataclass(frozen=True, slots=True)
class Part:
    """One unit of an operation that the rules decide on its own.

    `operation`: the fields the operation matchers see for this part; None
    means the whole operation's. `statement`: the SQL analysis of one
    statement, None when the part is not SQL. `depth`: how deep it is nested
    (0 = as sent), for display.
    """

    statement: StatementInfo | None = None
    operation: Operation | None = None
    depth: int = 0


Analyzer = Callable[[Operation], Sequence[Part]]


def _walk(statement: StatementInfo, depth: int) -> list[Part]:
    found = [Part(statement, depth=depth)]
    for child in statement.nested:
        found.extend(_walk(child, depth + 1))
    return found


@lru_cache(maxsize=4096)  # the proxy sees the same statement texts again and again
def _statement_parts(sql: str) -> tuple[Part, ...]:
    return tuple(part for top in analyze(sql) for part in _walk(top, 0))


def postgres(operation: Operation) -> tuple[Part, ...]:
    """Every statement of a PostgreSQL Query/Parse text, nested ones included, depth first (`sql.analyze`)."""
    if operation.kind != "statement":
        return ()
    sql = operation.text
    if len(sql) > _CACHE_MAX_TEXT:  # not pinned in the cache, as in sql.analyze
        return tuple(part for top in analyze(sql) for part in _walk(top, 0))
    return _statement_parts(sql)


def mysql(operation: Operation) -> tuple[Part, ...]:
    """Every statement of a MySQL COM_QUERY / COM_STMT_PREPARE text, nested ones included (`mysql_sql`)."""
    if operation.kind != "statement":
        return ()
    from .mysql_sql import analyze_mysql  # sqlglot loads only where MySQL is decided

    return tuple(part for top in analyze_mysql(operation.text) for part in _walk(top, 0))


ANALYZERS: dict[str, Analyzer] = {
    "postgres": postgres,
    "mysql": mysql,  # sqlglot's MySQL dialect, into StatementInfo parts (proxy.policy.mysql_sql)
    # "ssh": ssh,                shell-quoted argv; `sh -c '…'` and `;`/`&&` lists as parts of their own
    # "kubernetes": kubernetes,  verb, resource, namespace and name from the API path
}
"""Protocol name → its analyzer. A protocol not listed is decided on the operation's own fields."""


def parts(operation: Operation) -> tuple[Part, ...]:
    """The parts the rules decide: the analyzer's, or the operation as one part when there are none."""
    analyzer = ANALYZERS.get(operation.protocol)
    found = tuple(analyzer(operation)) if analyzer is not None else ()
    return found or (Part(),)

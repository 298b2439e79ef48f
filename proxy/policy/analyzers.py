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
import os.path
import shlex

from ingest.protocols.kubernetes.requestinfo import request_info

from .operation import AnalysisError, Operation
from .sql import _CACHE_MAX_TEXT, StatementInfo, analyze, numeric_shape, retold

__all__ = ["ANALYZERS", "Analyzer", "Part", "command_objects", "parts", "postgres", "retell", "shape", "shell_objects",
           "ssh"]


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


class ShellError(AnalysisError):
    what = "shell command"


_OPERATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "&>"})
_REDIRECTS = frozenset({">", ">>", "<", "<<", "<<<", ">|", "&>", "&>>", "<>"})
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})
_WRAPPERS = frozenset({"sudo", "env", "nohup", "exec", "command", "time", "nice", "doas", "xargs", "timeout",
                       "stdbuf", "setsid", "chroot", "su"})
_MAX_DEPTH = 4


def _words(text: str) -> list[str]:
    """Shell words and operators, with POSIX quoting rules (quotes removed, backslash escapes applied)."""
    # A newline ends a command as `;` does (inside quotes too: this is analysis only, never what runs).
    lexer = shlex.shlex(text.replace("\n", ";"), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError as exc:  # an unclosed quote or a trailing escape
        raise ShellError(f"{exc}: {text[:200]!r}") from None


def _is_path(word: str) -> bool:
    return word.startswith(("/", "./", "../", "~")) or ("/" in word and not word.startswith("-")) or word in (".", "..")


def command_objects(argv: list[str]) -> tuple[str, ...]:
    """The paths a simple command names: arguments that look like paths (`/etc/x`, `./y`, `a/b`, `~`)."""
    return tuple(dict.fromkeys(word for word in argv[1:] if _is_path(word)))


def shell_objects(text: str) -> tuple[str, ...]:
    """The paths a command line names: every simple command's path-like arguments and redirection targets."""
    found: list[str] = []
    for argv, targets in _simple_commands(text):
        found.extend(command_objects(_unwrap(argv)))
        found.extend(targets)
    return tuple(dict.fromkeys(found))


def _unwrap(argv: list[str]) -> list[str]:
    """`sudo -u x env A=1 nohup rm …` is `rm …`: leading assignments and wrapper commands (and their options) go."""
    while argv:
        if "=" in argv[0] and not argv[0].startswith("=") and argv[0].split("=", 1)[0].isidentifier():
            argv = argv[1:]
        elif os.path.basename(argv[0]) in _WRAPPERS and len(argv) > 1:
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                argv = argv[1:]
            if argv and argv[0].isdigit() and len(argv) > 1:  # timeout 5 cmd, nice -n 5 handled above
                argv = argv[1:]
        else:
            break
    return argv


def _simple_commands(text: str) -> list[tuple[list[str], list[str]]]:
    """The simple commands of a command line split at `;`, `&&`, `||`, `|`, `&`: (argv, redirect targets)."""
    out: list[tuple[list[str], list[str]]] = []
    argv: list[str] = []
    targets: list[str] = []
    words = _words(text)
    i = 0
    while i < len(words):
        word = words[i]
        if word in _REDIRECTS or (word[:1] in "<>" and word.strip("<>&|") == ""):
            if i + 1 < len(words):
                targets.append(words[i + 1])
            i += 2
            continue
        if word in _OPERATORS or word.strip(";&|()") == "":
            if argv or targets:
                out.append((argv, targets))
            argv, targets = [], []
        else:
            argv.append(word)
        i += 1
    if argv or targets:
        out.append((argv, targets))
    return out


def _substitutions(text: str) -> list[str]:
    """What `$(…)` and backticks run (best effort: outermost, balanced parentheses)."""
    found: list[str] = []
    i = 0
    while True:
        start = text.find("$(", i)
        if start < 0:
            break
        depth, j = 1, start + 2
        while j < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        found.append(text[start + 2:j - 1])
        i = j
    parts = text.split("`")
    found.extend(parts[k] for k in range(1, len(parts) - 1, 2))
    return found


def _shell_parts(operation: Operation, text: str, depth: int) -> list[Part]:
    found: list[Part] = []
    for argv, targets in _simple_commands(text):
        argv = _unwrap(argv)
        objects = command_objects(argv) + tuple(targets)
        if argv or objects:
            normal = shlex.join(argv)
            found.append(Part(operation=Operation(operation.protocol, operation.kind, normal, objects,
                                                  operation.attributes), depth=depth))
        if depth < _MAX_DEPTH and len(argv) >= 3 and os.path.basename(argv[0]) in _SHELLS:
            script = next((argv[k + 1] for k, w in enumerate(argv[:-1]) if w.startswith("-") and "c" in w[1:]),
                          None)
            if script is not None:
                found.extend(_shell_parts(operation, script, depth + 1))
    if depth < _MAX_DEPTH:
        for inner in _substitutions(text):
            found.extend(_shell_parts(operation, inner, depth + 1))
    return found


def ssh(operation: Operation) -> tuple[Part, ...]:
    """An SSH exec command line as the shell would read it: the line as sent, then every simple command.

    Each simple command (split at `;`, `&&`, `||`, `|`, `&`) is a part whose
    text is its argv re-quoted canonically (`'rm' "-rf" /` reads `rm -rf /`),
    without leading `VAR=value` assignments and wrappers such as `sudo`,
    `env`, `nohup`; its objects are the arguments that look like paths and
    redirection targets. `sh -c '…'`, `$(…)` and backticks are parsed again
    as parts of their own (nested). Best effort: a shell can always build a
    command at run time (`eval`, variables), which no parser sees.
    """
    if operation.kind != "command" or not operation.text.strip():
        return ()
    return (Part(), *_shell_parts(operation, operation.text, 0))


def kubernetes(operation: Operation) -> tuple[Part, ...]:
    """verb, API group/version, resource, subresource, namespace and name of a Kubernetes API request.

    Read from the request line (`operation.text`, or `attributes["request"]` for an exec, whose text
    is its command) with the API server's own rules (`ingest.protocols.kubernetes.requestinfo`), so
    `attributes = { verb = ["delete"], resource = ["secrets"] }` means what an RBAC rule would. The
    attributes the front end already set win; an operation that is not a request line has no parts.
    """
    method, _, target = (operation.attributes.get("request") or operation.text).partition(" ")
    if not target.startswith("/") or not method.isalpha():
        return ()
    info = request_info(method, target)
    attributes = {**info.attributes(), **operation.attributes}
    return (Part(operation=Operation(operation.protocol, operation.kind, operation.text,
                                     operation.objects or info.objects, attributes)),)


ANALYZERS: dict[str, Analyzer] = {
    "postgres": postgres,
    "ssh": ssh,
    "mysql": mysql,  # sqlglot's MySQL dialect, into StatementInfo parts (proxy.policy.mysql_sql)
    "kubernetes": kubernetes,  # verb, resource, namespace and name from the API path
}
"""Protocol name → its analyzer. A protocol not listed is decided on the operation's own fields."""


def parts(operation: Operation) -> tuple[Part, ...]:
    """The parts the rules decide: the analyzer's, or the operation as one part when there are none."""
    analyzer = ANALYZERS.get(operation.protocol)
    found = tuple(analyzer(operation)) if analyzer is not None else ()
    return found or (Part(),)


def shape(operation: Operation) -> str | None:
    """The text of another operation whose parts are this one's but for their text (`retell`), or None.

    For a PostgreSQL statement, its numeric shape (`sql.numeric_shape`): pgbench's and an ORM's statements differ
    in their numbers only, so rules that read no text decide them all as they decide their shape, and the
    rules' decision is computed once per shape (proxy.policy.rules.BoundPolicy).
    """
    if operation.kind != "statement" or ANALYZERS.get(operation.protocol) is not postgres:
        return None
    return numeric_shape(operation.text)


def retell(found: tuple[Part, ...], shape: str, text: str) -> tuple[Part, ...]:
    """The parts of the operation with `text`, from `found`, those of its shape's (`shape(operation)`)."""
    top = found[0].statement  # depth first, and a shape is one statement: the first part is the statement
    assert top is not None
    return tuple(_walk(retold(top, shape, text), 0))

"""The policy file: rules that allow, block or hold operations, masks that hide values.

Policy decides on an *operation* (`proxy.policy.operation.Operation`): its
protocol, kind, text, objects and attributes, as the front end reports them.
The protocol's analyzer (`proxy.policy.analyzers`; for PostgreSQL the pglast
parse tree of `proxy.policy.sql`) splits it into the parts that are decided.

Evaluation order, which a policy author must know:

* Every part is decided on its own. For SQL that is each top-level statement
  of the message and every statement nested in it (a DELETE in a CTE, the
  body of a DO block, a PREPAREd query…; see `proxy.policy.sql`); an
  operation without an analyzer (or one the analyzer finds nothing in) is
  one part, decided on its own fields. For each part, the rules are tried
  top to bottom and the **first rule whose matchers all match decides** it;
  no match means `allow` (the operation is still recorded — who may connect
  at all is the proxy's identity check, not the policy's). So put narrow
  exceptions (`dba` may TRUNCATE) above broad rules.
* The operation gets the **strictest** of its parts' decisions
  (block > hold > allow): one blocked statement blocks the whole message,
  and an `allow` rule for the SELECT around a CTE cannot wave its DELETE
  through.
* Text the analyzer cannot read (SQL that does not parse) gets
  `on_parse_error` (default `block`) — or the decision of a rule that
  matches the operation's own fields, if that one is stricter.
* Masks are not first-match: every `[[mask]]` that applies to the identity
  adds its detectors and columns.

Within a rule, all matchers given must match; a list matches if any entry
does; a rule with no matchers at all matches everything.

* Identity: `subjects`, `groups`, `not_groups`, `targets`.
* Operation (any protocol): `protocols` (postgres, mysql, ssh, http,
  kubernetes), `operations` (kinds: statement, command, request, transfer,
  forward), `objects` (shell patterns; matches if any object matches),
  `text` (a regular expression, searched anywhere in the text; Python `re`
  syntax, `(?i)` for case-insensitive) and `attributes` (a table of
  attribute name → list of shell patterns; every attribute named must be
  present and match, e.g. `attributes = { verb = ["delete"] }`).
* SQL statements: `statements` (kinds from `proxy.policy.sql.KINDS`),
  `tables`, `functions`, `without_where`. They read the analyzer's statement
  analysis, so a rule using any of them matches only parts that have one
  (today: PostgreSQL statements); add `protocols` to narrow it further.

`subjects`, `targets`, `objects`, attribute values, `tables`, `functions`
and `columns` take shell-style patterns (`*`, `?`, `[…]`; `*` also matches
`/`). Tables, functions and columns compare case-insensitively, the others
exactly. A table pattern without a schema matches that table in any
schema, and a table the SQL names without a schema matches a pattern for
any schema (search_path decides at run time, so the policy assumes the
worst). `text` is a plain search of the text as sent: for SQL, prefer the
statement matchers, which comments, case and quoting do not disguise.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import time
import tomllib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ingest.errors import CustodyError

from .analyzers import Part, parts, retell, shape
from .detectors import DETECTORS
from .masking import MaskPlan
from .operation import OPERATION_KINDS, PROTOCOLS, AnalysisError, Operation
from .sql import KINDS, StatementInfo

__all__ = ["ACTIONS", "BoundPolicy", "Decision", "IdentityMatch", "MaskRule", "Policy", "PolicyError", "PolicyHolder", "Rule"]

log = logging.getLogger(__name__)

ACTIONS = ("allow", "hold", "block")
_SEVERITY = {action: rank for rank, action in enumerate(ACTIONS)}


class PolicyError(CustodyError):
    """A policy file that cannot be used; the message names the file, the rule and the key."""


# --- matching ---------------------------------------------------------------------

def _any_pattern(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _name_matches(name: str, pattern: str) -> bool:
    """Table/function name against a pattern, both lowercased; see the module docstring for schemas."""
    if fnmatchcase(name, pattern):
        return True
    if "." not in pattern:
        return fnmatchcase(name.rpartition(".")[2], pattern)
    return "." not in name and fnmatchcase(name, pattern.rpartition(".")[2])


def _any_name(names: Iterable[str], patterns: tuple[str, ...]) -> bool:
    return any(_name_matches(name.lower(), pattern) for name in names for pattern in patterns)


@dataclass(frozen=True, slots=True)
class IdentityMatch:
    """Who and where a rule or mask applies to; an empty matcher matches everyone / everywhere."""

    subjects: tuple[str, ...] = ()
    groups: frozenset[str] = frozenset()
    excluded_groups: frozenset[str] = frozenset()
    targets: tuple[str, ...] = ()

    def matches(self, subject: str, groups: frozenset[str], target: str) -> bool:
        return (
            (not self.subjects or _any_pattern(subject, self.subjects))
            and (not self.groups or not self.groups.isdisjoint(groups))
            and self.excluded_groups.isdisjoint(groups)
            and (not self.targets or _any_pattern(target, self.targets))
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rule]]`: identity, operation and statement matchers, and what to do with a part they match."""

    name: str
    action: str
    message: str
    approvers: tuple[str, ...]
    identity: IdentityMatch
    protocols: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()
    objects: tuple[str, ...] = ()
    text: re.Pattern[str] | None = None
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    statements: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    without_where: bool = False
    reads_statements: bool = field(init=False)
    """Whether the rule has statement matchers, and so matches only parts with a statement analysis."""
    reads_operation: bool = field(init=False)
    """Whether the rule has operation matchers (else every operation matches: the check is skipped)."""

    def __post_init__(self) -> None:
        reads = bool(self.statements or self.tables or self.functions or self.without_where)
        object.__setattr__(self, "reads_statements", reads)
        reads = bool(self.protocols or self.operations or self.objects or self.text is not None or self.attributes)
        object.__setattr__(self, "reads_operation", reads)

    def matches_operation(self, operation: Operation) -> bool:
        return not self.reads_operation or (
            (not self.protocols or operation.protocol in self.protocols)
            and (not self.operations or operation.kind in self.operations)
            and (not self.objects or any(_any_pattern(o, self.objects) for o in operation.objects))
            and (self.text is None or self.text.search(operation.text) is not None)
            and all(name in operation.attributes and _any_pattern(operation.attributes[name], patterns)
                    for name, patterns in self.attributes)
        )

    def matches_statement(self, statement: StatementInfo | None) -> bool:
        if not self.reads_statements:
            return True
        return statement is not None and (
            (not self.statements or statement.kind in self.statements)
            and (not self.tables or _any_name(statement.tables, self.tables))
            and (not self.functions or _any_name(statement.functions, self.functions))
            and (not self.without_where or statement.has_where is False)
        )

    def explain(self, subject: str, groups: Collection[str], target: str,
                operation: Operation, statement: StatementInfo | None) -> tuple[str, ...]:
        """Why this rule matched: one line per matcher it has, naming what matched it."""
        def first(values: Iterable[str], patterns: Iterable[str], match: Callable[[str, str], bool] = fnmatchcase) -> str:
            return next((f"{p!r} matched {v!r}" for v in values for p in patterns if match(v, p)), "")

        ident, why = self.identity, []
        if ident.subjects:
            why.append(f"subjects: {first([subject], ident.subjects)}")
        if ident.groups:
            why.append(f"groups: member of {', '.join(sorted(ident.groups.intersection(groups)))}")
        if ident.excluded_groups:
            why.append(f"not_groups: not a member of {', '.join(sorted(ident.excluded_groups))}")
        if ident.targets:
            why.append(f"targets: {first([target], ident.targets)}")
        if self.protocols:
            why.append(f"protocols: {operation.protocol}")
        if self.operations:
            why.append(f"operations: {operation.kind}")
        if self.objects:
            why.append(f"objects: {first(operation.objects, self.objects)}")
        if self.text is not None:
            found = self.text.search(operation.text)
            why.append(f"text: /{self.text.pattern}/ found {(found.group(0) if found else '')[:80]!r}")
        for name, patterns in self.attributes:
            why.append(f"attributes: {name} {first([operation.attributes.get(name, '')], patterns)}")
        if statement is not None and self.reads_statements:
            if self.statements:
                why.append(f"statements: {statement.kind}")
            lower = [name.lower() for name in statement.tables]
            if self.tables:
                why.append(f"tables: {first(lower, self.tables, _name_matches)}")
            if self.functions:
                why.append(f"functions: {first([f.lower() for f in statement.functions], self.functions, _name_matches)}")
            if self.without_where:
                why.append(f"without_where: the {statement.kind} has no WHERE that filters")
        return tuple(why) or ("no matchers: the rule matches everything",)


@dataclass(frozen=True, slots=True)
class MaskRule:
    """One `[[mask]]`: for whom, which detectors run on values, which column names hide whole values."""

    name: str
    identity: IdentityMatch
    detectors: frozenset[str]
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Decision:
    """The verdict on one operation: the action, the rule that made it (None: no rule matched), and why.

    `parts` are what the rules decided (the analyzer's parts, or the
    operation as one part); `part` is the one the deciding rule matched.
    `statements` is the SQL analysis (top-level statements; empty after a
    parse error or for an operation that is not SQL); `matched` is the
    statement, possibly a nested one, that the deciding rule matched.

    Built from `found` (the parts) and `index` (the deciding part's place in them). A decision by numeric
    shape (`BoundPolicy`) has its shape's parts and `shape`, and tells them with the operation's own text only
    when they are read: the proxy reads the action, rule, message and approvers, and retelling is most of what
    a new statement of a known shape would cost.
    """

    action: str
    rule: str | None
    message: str
    approvers: tuple[str, ...]
    operation: Operation | None = None
    found: tuple[Part, ...] = ()
    index: int | None = None
    shape: str | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        if self.shape is None or self.operation is None:
            return self.found
        return retell(self.found, self.shape, self.operation.text)

    @property
    def part(self) -> Part | None:
        return None if self.index is None else self.parts[self.index]

    @property
    def statements(self) -> tuple[StatementInfo, ...]:
        return tuple(p.statement for p in self.parts if p.depth == 0 and p.statement is not None)

    @property
    def matched(self) -> StatementInfo | None:
        part = self.part
        return None if part is None else part.statement

    def _told(self) -> tuple[Any, ...]:
        return self.action, self.rule, self.message, self.approvers, self.operation, self.parts, self.index

    def __eq__(self, other: object) -> bool:
        """Equal when they say the same of the same operation, however their parts are kept."""
        return isinstance(other, Decision) and self._told() == other._told()

    def __hash__(self) -> int:
        return hash((self.action, self.rule, self.message, self.approvers, self.operation))


def _strictest(operation: Operation, rules: tuple[Rule, ...], whole: list[Rule], found: tuple[Part, ...]) -> Decision:
    """First match per part, strictest over the parts; on a tie the earlier part decides.

    `rules` apply to the identity; `whole` are those that also match the operation's own fields.
    """
    best, best_rank = Decision("allow", None, "", (), operation, found), (0, False)
    for index, part in enumerate(found):
        candidates = whole if part.operation is None else [r for r in rules if r.matches_operation(part.operation)]
        rule = next((r for r in candidates if not r.reads_statements or r.matches_statement(part.statement)), None)
        if rule is None:
            continue
        rank = (_SEVERITY[rule.action], True)
        if rank > best_rank:
            best = Decision(rule.action, rule.name, rule.message, rule.approvers, operation, found, index)
            best_rank = rank
    return best


# --- the policy ---------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """A loaded, checked policy file; immutable, so a reload swaps it whole."""

    source: str
    on_parse_error: str
    parse_error_approvers: tuple[str, ...]
    hold_timeout_seconds: float
    rules: tuple[Rule, ...]
    masks: tuple[MaskRule, ...]
    _bindings: dict[tuple[str, frozenset[str], str], BoundPolicy] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
        return cls.from_toml(text, str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<policy>") -> Policy:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: not valid TOML: {exc}") from None
        return _parse_policy(source, raw)

    def decide(self, subject: str, groups: Collection[str], target: str, operation: Operation) -> Decision:
        """The strictest decision over every part of `operation`; see the module docstring for the order."""
        return self.bind(subject, groups, target).decide(operation)

    def bind(self, subject: str, groups: Collection[str], target: str) -> BoundPolicy:
        """The rules that apply to one identity on one target; shared by its sessions, so their decisions
        are computed once per policy file (a reload makes a new `Policy`, and new bindings)."""
        key = (subject, frozenset(groups), target)
        bound = self._bindings.get(key)
        if bound is None:
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()
            rules = tuple(rule for rule in self.rules if rule.identity.matches(subject, key[1], target))
            bound = self._bindings[key] = BoundPolicy(self, rules)
        return bound

    def masking_for(self, subject: str, groups: Collection[str], target: str) -> MaskPlan | None:
        """What to hide from this identity on this target: the union of every applicable `[[mask]]`."""
        group_set = frozenset(groups)
        applicable = [m for m in self.masks if m.identity.matches(subject, group_set, target)]
        if not applicable:
            return None
        return MaskPlan(
            detectors=frozenset().union(*(m.detectors for m in applicable)),
            columns=tuple(dict.fromkeys(c for m in applicable for c in m.columns)),
            rules=tuple(m.name for m in applicable),
        )


_MAX_BINDINGS = 4096  # identities x targets one policy file has seen; cleared when full (rebuilt on demand)
_MAX_DECISIONS = 1024  # distinct operations remembered per binding; cleared when full


class BoundPolicy:
    """`Policy.decide` for one identity and target, remembering its decisions.

    A decision is a pure function of the rules and the operation, and clients
    repeat their statements (pgbench, an ORM, a job's loop), so the repeated
    operation costs one dictionary lookup. The caches are cleared, not
    evicted entry by entry, when full: sessions on several threads share them,
    and `dict.clear` is one atomic step under the GIL.
    """

    def __init__(self, policy: Policy, rules: tuple[Rule, ...]) -> None:
        self.policy, self.rules = policy, rules
        self._decisions: dict[Operation, Decision] = {}
        self._shapes: dict[tuple[str, str, str, tuple[str, ...]], Decision] = {}  # (protocol, kind, shape, objects)
        self._by_shape = all(rule.text is None for rule in rules)  # a `text` pattern may read the very numbers

    def decide(self, operation: Operation) -> Decision:
        decision = self._decisions.get(operation)
        if decision is None:
            decision = (self._by_shape and self._decide_by_shape(operation)) or self._decide(operation)
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[operation] = decision
        return decision

    def _decide_by_shape(self, operation: Operation) -> Decision | None:
        """The decision on the operation's shape (`analyzers.shape`), for the operation; None: it has no shape.

        Sound because no rule here reads the text (`_by_shape`): every other field the rules read is the same
        for the operation and its shape, its parts are the shape's with the operation's text, and so each rule
        matches the same parts and the same rule decides the same part. Only the text is the operation's own:
        the decision's parts are the shape's, told with it when they are read (`Decision.parts`).
        """
        form = shape(operation)
        if form is None:
            return None
        key = (operation.protocol, operation.kind, form, operation.objects)
        template = self._shapes.get(key)
        if template is None or template.operation.attributes != operation.attributes:  # type: ignore[union-attr]
            template = self._decide(Operation(operation.protocol, operation.kind, form, operation.objects,
                                              operation.attributes))
            if len(self._shapes) >= _MAX_DECISIONS:
                self._shapes.clear()
            self._shapes[key] = template
        return Decision(template.action, template.rule, template.message, template.approvers, operation,
                        template.found, template.index, form)

    def _decide(self, operation: Operation) -> Decision:
        policy, rules = self.policy, self.rules
        whole = [rule for rule in rules if not rule.reads_operation or rule.matches_operation(operation)]
        try:
            found = parts(operation)
        except AnalysisError as exc:
            on_error = Decision(policy.on_parse_error, "on_parse_error", f"{exc.what} not understood: {exc}",
                                policy.parse_error_approvers if policy.on_parse_error == "hold" else (),
                                operation, ())
            fields_only = _strictest(operation, rules, whole, (Part(),))
            return fields_only if _SEVERITY[fields_only.action] > _SEVERITY[on_error.action] else on_error
        return _strictest(operation, rules, whole, found)


# --- parsing and checking the file ------------------------------------------------------

_TOP_KEYS = {"on_parse_error", "parse_error_approvers", "hold_timeout_seconds", "rule", "mask"}
_IDENTITY_KEYS = {"subjects", "groups", "targets"}
_OPERATION_KEYS = {"protocols", "operations", "objects", "text", "attributes"}
_STATEMENT_KEYS = {"statements", "tables", "functions", "without_where"}
_RULE_KEYS = {"name", "action", "message", "approvers", "not_groups", *_IDENTITY_KEYS, *_OPERATION_KEYS, *_STATEMENT_KEYS}
_MASK_KEYS = {"name", "detectors", "columns", "except_groups", *_IDENTITY_KEYS}


class _Entry:
    """One table of the policy file with typed accessors whose errors name the file, the entry and the key."""

    def __init__(self, source: str, where: str, raw: Any, allowed: set[str]):
        self.source, self.where = source, where
        if not isinstance(raw, dict):
            raise PolicyError(f"{source}: {where}: expected a table, got {raw!r}")
        self.raw = raw
        for key in raw:
            if key not in allowed:
                raise self.error(key, f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def error(self, key: str, problem: str) -> PolicyError:
        return PolicyError(f"{self.source}: {self.where}: {key}: {problem}")

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, "missing (required)" if value is None else f"expected a non-empty string, got {value!r}")
        return value

    def names(self, key: str, known: Collection[str] | None = None) -> tuple[str, ...]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"expected a list of non-empty strings, got {value!r}")
        for name in value:
            if known is not None and name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise self.error(key, f"unknown name {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return tuple(value)

    def pattern(self, key: str) -> re.Pattern[str] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a regular expression (a non-empty string), got {value!r}")
        try:
            return re.compile(value)
        except re.error as exc:
            shown = value.replace("\r", "\\r").replace("\n", "\\n")  # the error stays one line
            raise self.error(key, f"invalid regular expression /{shown}/: {exc}") from None

    def table_of_names(self, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        value = self.raw.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table of name = [patterns], got {value!r}")
        found = []
        for name, patterns in value.items():
            if not name:
                raise self.error(key, "an attribute name must not be empty")
            if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise self.error(f"{key}.{name}", f"expected a non-empty list of non-empty strings, got {patterns!r}")
            found.append((name, tuple(patterns)))
        return tuple(found)

    def boolean(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.error(key, f"expected a number > 0, got {value!r}")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def identity(self, excluded_key: str) -> IdentityMatch:
        return IdentityMatch(
            subjects=self.names("subjects"),
            groups=frozenset(self.names("groups")),
            excluded_groups=frozenset(self.names(excluded_key)),
            targets=self.names("targets"),
        )


def _entries(source: str, raw: dict[str, Any], key: str, allowed: set[str]) -> list[_Entry]:
    """The `[[key]]` tables, each named by its `name` (or its position while the name is missing)."""
    tables = raw.get(key, [])
    if not isinstance(tables, list):
        raise PolicyError(f"{source}: [[{key}]] must be an array of tables")
    entries, seen = [], set()
    for index, table in enumerate(tables, start=1):
        name = table.get("name") if isinstance(table, dict) else None
        entry = _Entry(source, f"{key} {name!r}" if isinstance(name, str) and name else f"{key} #{index}", table, allowed)
        entry.string("name")
        if name in seen:
            raise entry.error("name", "used by an earlier entry; names must be unique")
        seen.add(name)
        entries.append(entry)
    return entries


def _rule(entry: _Entry) -> Rule:
    action = entry.choice("action", ACTIONS)
    name = entry.string("name")
    approvers = entry.names("approvers")
    if action == "hold" and not approvers:
        raise entry.error("approvers", "a hold rule needs the groups that may approve it")
    if action != "hold" and approvers:
        raise entry.error("approvers", f"only hold rules have approvers, this one is {action}")
    default_message = {
        "allow": f"allowed by policy rule {name}",
        "hold": f"held for approval by {', '.join(approvers)} (policy rule {name})",
        "block": f"blocked by policy rule {name}",
    }[action]
    return Rule(
        name=name,
        action=action,
        message=entry.string("message", default_message),
        approvers=approvers,
        identity=entry.identity("not_groups"),
        protocols=frozenset(entry.names("protocols", PROTOCOLS)),
        operations=frozenset(entry.names("operations", OPERATION_KINDS)),
        objects=entry.names("objects"),
        text=entry.pattern("text"),
        attributes=entry.table_of_names("attributes"),
        statements=frozenset(entry.names("statements", KINDS)),
        tables=tuple(p.lower() for p in entry.names("tables")),
        functions=tuple(p.lower() for p in entry.names("functions")),
        without_where=entry.boolean("without_where"),
    )


def _mask(entry: _Entry) -> MaskRule:
    mask = MaskRule(
        name=entry.string("name"),
        identity=entry.identity("except_groups"),
        detectors=frozenset(entry.names("detectors", DETECTORS)),
        columns=tuple(p.lower() for p in entry.names("columns")),
    )
    if not mask.detectors and not mask.columns:
        raise entry.error("detectors", "a mask needs detectors or columns")
    return mask


def _parse_policy(source: str, raw: dict[str, Any]) -> Policy:
    top = _Entry(source, "top level", raw, _TOP_KEYS)
    on_parse_error = top.choice("on_parse_error", ACTIONS, "block")
    approvers = top.names("parse_error_approvers")
    if on_parse_error == "hold" and not approvers:
        raise top.error("parse_error_approvers", "on_parse_error = \"hold\" needs the groups that may approve")
    return Policy(
        source=source,
        on_parse_error=on_parse_error,
        parse_error_approvers=approvers,
        hold_timeout_seconds=top.number("hold_timeout_seconds", 300),
        rules=tuple(_rule(e) for e in _entries(source, raw, "rule", _RULE_KEYS)),
        masks=tuple(_mask(e) for e in _entries(source, raw, "mask", _MASK_KEYS)),
    )


# --- reloading -----------------------------------------------------------------------------

def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the file is edited in place or replaced by rename."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class PolicyHolder:
    """The current policy of one proxy, reloaded when its file changes, without dropping sessions.

    Sessions ask `holder.policy` per message; at most every `check_interval`
    seconds that costs a stat(). A changed file that fails to load leaves the
    previous policy in force, logs one line, and is reported by `last_error`
    until a later version loads. The first load has no previous policy to
    fall back on, so it raises PolicyError.
    """

    def __init__(self, path: str | os.PathLike[str], check_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.check_interval, self._clock = check_interval, clock
        self._stamp = _stamp(self.path) if self.path.exists() else None
        self._policy = Policy.load(self.path)
        self._next_check = clock() + check_interval
        self.last_error: str | None = None

    @property
    def policy(self) -> Policy:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self._reload_if_changed()
        return self._policy

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            self._keep_old(f"{self.path}: cannot read policy file: {exc.strerror}")
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a broken version is reported once, not re-read on every check
        try:
            self._policy = Policy.load(self.path)
        except PolicyError as exc:
            self._keep_old(str(exc))
            return
        self.last_error = None
        log.info("policy %s reloaded: %d rules, %d masks", self.path, len(self._policy.rules), len(self._policy.masks))

    def _keep_old(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("policy not reloaded, previous policy stays in force: %s", reason)
        self.last_error = reason

"""`custody sessions` filters as one parameterized query over the `sessions` view.

Values are bound as parameters, never spliced into SQL text. Times are ISO 8601
(a date, or a date-time; UTC unless an offset is given) or relative to now
(`90m`, `24h`, `7d`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ingest.errors import CustodyError

_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

COLUMNS = ("session_id", "started", "duration", "subject", "source_address", "target", "client_application",
           "statements", "errors", "violations", "end_reason")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from ISO 8601 or a relative `<n><unit>` ago."""
    if match := _RELATIVE.fullmatch(text.strip()):
        return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CustodyError(f"{text!r}: expected a time like 2026-03-02, 2026-03-02T08:00Z or 24h") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class SessionFilter:
    identity: str | None = None
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    with_violations: bool = False
    limit: int | None = 100

    def query(self) -> tuple[str, list[Any]]:
        """The SQL and its parameters: newest sessions first."""
        where, params = [], []
        if self.identity:
            where.append("(subject = ? OR email = ?)")
            params += [self.identity, self.identity]
        if self.target:
            where.append("target = ?")
            params.append(self.target)
        if self.since:
            where.append("started >= ?")
            params.append(self.since)
        if self.until:
            where.append("started < ?")
            params.append(self.until)
        if self.with_violations:
            where.append("violations > 0")
        sql = f"SELECT {', '.join(COLUMNS)} FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started DESC"
        if self.limit:
            sql += f" LIMIT {int(self.limit)}"
        return sql, params

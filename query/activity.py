"""`custody activity`: everything an identity did, everywhere, in order — one parameterized query over `activity`.

Values are bound as parameters, never spliced into SQL text. Times as in
`custody sessions` (`query.filters.parse_time`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

COLUMNS = ("ts", "subject", "protocol", "target", "operation", "text", "objects", "outcome", "error_code",
           "policy_action", "policy_rule", "session_id", "operation_no")


@dataclass(frozen=True)
class ActivityFilter:
    identity: str | None = None
    target: str | None = None
    protocol: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = 1000

    def query(self) -> tuple[str, list[Any]]:
        """The SQL and its parameters: operations oldest first (the first `limit` of them)."""
        where, params = [], []
        if self.identity:
            where.append("(subject = ? OR email = ?)")
            params += [self.identity, self.identity]
        for column in ("target", "protocol"):
            if value := getattr(self, column):
                where.append(f"{column} = ?")
                params.append(value)
        if self.since:
            where.append("ts >= ?")
            params.append(self.since)
        if self.until:
            where.append("ts < ?")
            params.append(self.until)
        sql = f"SELECT {', '.join(COLUMNS)} FROM activity"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, session_id, operation_no"
        if self.limit:
            sql += f" LIMIT {int(self.limit)}"
        return sql, params

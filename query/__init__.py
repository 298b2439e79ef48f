"""DuckDB over the sealed segments: views, SQL, session replay."""

from query.views import open_ledger

__all__ = ["open_ledger"]

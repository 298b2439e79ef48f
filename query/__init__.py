"""DuckDB over the sealed segments: views, SQL, session replay.

`from query import open_ledger` (notebooks, scripts) is resolved on first use: importing the package imports
nothing else, so the bundle verifier and its worker processes, which import `query.bundle_verify`, start
without DuckDB and the views."""

from __future__ import annotations

from typing import Any

__all__ = ["open_ledger"]


def __getattr__(name: str) -> Any:
    if name == "open_ledger":
        from query.views import open_ledger

        return open_ledger
    raise AttributeError(f"module 'query' has no attribute {name!r}")

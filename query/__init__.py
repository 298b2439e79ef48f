"""DuckDB over the sealed segments: views, SQL, session replay (`query.views.open_ledger`).

Nothing is imported here: the bundle verifier and its worker processes import `query.bundle_verify` without
DuckDB and the views."""

"""The root exception type: the `custody` command turns any `CustodyError` into a one-line error.

It lives in `ingest`, the floor every package already imports, so that raising
it never makes a package import the `custody` command above it.
"""


class CustodyError(Exception):
    """A failure the user can act on; its message is the whole story, so no traceback is shown."""

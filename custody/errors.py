"""The one exception type the `custody` command turns into a one-line error."""


class CustodyError(Exception):
    """A failure the user can act on; its message is the whole story, so no traceback is shown."""

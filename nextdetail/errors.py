"""User-facing errors: one line that names the thing and the fix, never a traceback."""


class UserError(Exception):
    """Bad configuration, input or environment. The CLI prints ``str(err)`` on one line and exits 2.

    Deterministic: retrying the same run gives the same error, so stages never retry it.
    """

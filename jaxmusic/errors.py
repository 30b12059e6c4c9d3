"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, a wrong shape, a bad argument)
raises `UserError` with one line that names the offending thing. The CLI prints that
line and exits non-zero without a traceback; library callers can catch it.
"""


class UserError(Exception):
    """An error in the user's input, reported as one clear line."""

"""User-facing errors.

Anything a user can cause (a bad path, a bad recipe key, a malformed data row) raises
`QloraError` with a one-line message that names the file, field or row. The CLI prints
that line and exits non-zero without a traceback; everything else is a bug and keeps
its traceback.
"""


class QloraError(Exception):
    """An error caused by user input; its message is shown as-is, on one line."""

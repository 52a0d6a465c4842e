"""User-facing errors.

Anything a user can cause (a bad path, a bad recipe key, a malformed data row) raises
`QloraError` with a one-line message that names the file, field or row. The CLI prints
that line and exits non-zero without a traceback; everything else is a bug and keeps
its traceback.
"""


class QloraError(Exception):
    """An error caused by user input; its message is shown as-is, on one line."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after a checkpoint was saved in `path`."""

    def __init__(self, step: int, path):
        super().__init__(f"interrupted: checkpoint saved at step {step} in {path}")
        self.step, self.path = step, path

"""The exception roots. `UserError` is everything a user can fix; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as `error: FILE: field: reason`, exit code 2."""

    def __init__(self, message: str, file: str | None = None, field: str | None = None):
        self.file, self.field, self.reason = file, field, message
        super().__init__(self.line())

    def line(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        return ": ".join([*parts, self.reason])


class TrialFailed(Exception):
    """A trial that cannot go on (diverged, out of memory, raised): recorded as FAIL with `reason`."""

    def __init__(self, reason: str, step: int | None = None):
        self.reason, self.step = reason, step
        super().__init__(reason)

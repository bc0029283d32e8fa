"""Errors a user can act on. The CLI prints them without a traceback."""


class CurateError(Exception):
    """A problem with the user's input, configuration or environment; the message says how to fix it."""


class RowError(CurateError):
    """One input row cannot be used. `reason` is a short key counted in the manifest."""

    def __init__(self, reason: str, message: str, *, field: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.field = field


class StaleOutputError(CurateError):
    """OUT holds an expensive stage's output from other inputs, settings or q-curate version."""

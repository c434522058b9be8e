"""The user's errors: bad input that the user can fix, each kind with a stable ``code`` (torch-free).

Every interface reports them the same way: the CLI prints ``error: <message>`` and exits 2, a worker fails
the job with ``error.code`` = ``code`` and the message, the API answers 422 at the request field named by
``field``. Anything that is not a ``UserError`` is a bug of ours: the CLI shows its traceback and a worker
logs it and fails the job as ``internal``. So code that wraps a library's failure catches only the
exceptions that mean bad input (a missing file, a malformed header), never ``Exception``.
"""

from __future__ import annotations

from typing import ClassVar


class UserError(Exception):
    """Bad input. ``field``: the setting or request field at fault (None: the input as a whole); ``accepted``:
    what would have been accepted, appended to the message as '; accepted: ...'."""

    code: ClassVar[str] = "bad_input"

    def __init__(self, message: str, *, field: str | None = None, accepted: str | None = None) -> None:
        super().__init__(message if accepted is None else f"{message}; accepted: {accepted}")
        self.message, self.field, self.accepted = message, field, accepted


class ConfigError(UserError, ValueError):
    """A setting that is out of range, unknown or impossible with the others."""

    code = "bad_config"

    def __init__(self, field: str | None, message: str, accepted: str | None = None) -> None:
        super().__init__(message, field=field, accepted=accepted)


class ModelError(UserError, ValueError):
    """A model that cannot be fetched, read or quantized (unsupported family, missing or malformed weights)."""

    code = "bad_model"


class DataError(UserError, ValueError):
    """A text source that cannot be read or is too short."""

    code = "bad_data"


class ExportError(UserError, ValueError):
    """Export formats this config cannot be written as (the request's ``formats``)."""

    code = "bad_config"

    def __init__(self, message: str, *, accepted: str | None = None) -> None:
        super().__init__(message, field="formats", accepted=accepted)


class CheckpointError(UserError, ValueError):
    """A truncated, corrupted, tampered or incomplete checkpoint; the message names the bad file."""

    code = "bad_checkpoint"

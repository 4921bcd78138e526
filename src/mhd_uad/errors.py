"""One exception type for every bad input: the CLI prints its message and exits non-zero, no traceback."""

from __future__ import annotations

from pathlib import Path


class MhdUadError(Exception):
    """A user-facing error: bad input, bad params, missing files. The message names the file and the problem."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if path is not None else message)


class InputFileError(MhdUadError):
    """An input file is missing, unreadable or inconsistent with its siblings."""


class ConfigError(MhdUadError):
    """The composed params are invalid (unknown keys, impossible sizes, unknown profile)."""

"""Error types that the CLI turns into one clear line and exit code 2.

Library code raises these for bad *user input* (files, fields, options). Programming errors stay
ordinary exceptions so that they keep their tracebacks.
"""

from __future__ import annotations

from pathlib import Path


class SkyfallError(Exception):
    """Base class for user-facing errors: the CLI prints ``str(err)`` and exits with code 2."""


class TileFormatError(SkyfallError):
    """A tile folder (or one of its files) does not follow the tile format.

    The message always names the offending file and, where there is one, the field.
    """

    def __init__(self, file: str | Path, field: str | None, message: str):
        self.file = Path(file)
        self.field = field
        self.message = message
        where = f"{self.file}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")


class ConfigError(SkyfallError):
    """An invalid option value or config file."""


class MissingDependencyError(SkyfallError, ImportError):
    """An optional dependency is missing; the message names the pip extra that provides it."""

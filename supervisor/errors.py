"""Errors raised by the supervisor package.

The tree::

    CorralError                 (bus.errors)
    ├── ConfigError             corral.yaml is invalid (``path``, ``line``, ``field``)
    ├── StoreError              PostgreSQL failed (``retryable``)
    │   └── ConcurrentChange    a conversation was saved by someone else mid-decision
    └── LauncherError           an embedded server or child process could not start
"""

from __future__ import annotations

from corral.bus.errors import CorralError


class ConfigError(CorralError):
    """A configuration file is invalid; the message names the file, line and field.

    Args:
        message: The full, human-readable message.
        path: The file.
        line: 1-based line of the offending field, if known.
        field: Dotted path of the field, e.g. ``graph.edges.triage[1]``.
    """

    def __init__(self, message: str, *, path: str, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


class StoreError(CorralError):
    """A PostgreSQL operation failed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ConcurrentChange(StoreError):
    """A conversation was saved by another decision since it was read; decide again."""


class LauncherError(CorralError):
    """An embedded server or a child process could not be started."""

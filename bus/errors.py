"""Errors raised by the bus package.

The tree::

    CorralError
    └── BusError                  NATS/JetStream failures (``subject``, ``retryable``)
        ├── BusConnectError       the server could not be reached
        └── PoisonMessageError    a message that cannot be decoded; never retried
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    retryable: bool = False
    """Whether repeating the same operation may succeed."""


class BusError(CorralError):
    """A NATS or JetStream operation failed.

    Args:
        message: What went wrong.
        subject: The subject involved, if any.
        retryable: Whether the operation may succeed when repeated.
    """

    def __init__(self, message: str, *, subject: str | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.subject = subject
        self.retryable = retryable


class BusConnectError(BusError):
    """The NATS server could not be reached."""


class PoisonMessageError(BusError):
    """A message failed to decode; it is dead-lettered, never redelivered."""

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message, subject=subject, retryable=False)

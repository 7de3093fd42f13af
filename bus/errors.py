"""Errors raised by the bus package.

The tree::

    CorralError
    └── BusError                  NATS/JetStream failures (``subject``, ``retryable``)
        ├── BusConnectError       the server could not be reached
        │   └── ConnectionClosedError  the connection was closed for good; the process must end
        ├── PayloadTooLargeError  a message (with its headers) over the server's max_payload
        │                         or a configured limit; never retried
        └── PoisonMessageError    a message that cannot be decoded; never retried
"""

from __future__ import annotations

import msgspec


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


class ConnectionClosedError(BusConnectError):
    """The NATS connection was closed for good (the server closed it, or reconnecting gave
    up): nothing this process does on it can succeed, so the process must end and be
    restarted by whatever started it."""

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message, subject=subject, retryable=False)


class PayloadTooLargeError(BusError):
    """A message is bigger than it may be: the server's ``max_payload`` (headers included)
    or one of corral's configured limits. Sending it again can never succeed.

    Args:
        message: What is too big.
        size: Its size in bytes.
        limit: The limit it exceeds, in bytes.
        subject: The subject it was for, if any.
    """

    def __init__(self, message: str, *, size: int, limit: int, subject: str | None = None) -> None:
        super().__init__(message, subject=subject, retryable=False)
        self.size = size
        self.limit = limit


_DETERMINISTIC = (
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    RecursionError,
    msgspec.MsgspecError,
)
"""Exceptions that say the input itself is wrong: handling it again fails the same way."""


def is_retryable(exc: BaseException) -> bool:
    """Whether handling the same input again may succeed after ``exc``.

    A ``CorralError`` says so itself; errors that come from the input (bad values, a
    decode failure, nesting too deep) are not; anything else (a connection, a timeout,
    a server's hiccup) is, within the caller's bound on attempts.
    """
    if isinstance(exc, CorralError):
        return exc.retryable
    return not isinstance(exc, _DETERMINISTIC)

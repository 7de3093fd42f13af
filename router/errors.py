"""Errors raised by the router package.

The tree::

    CorralError                (bus.errors)
    └── RouterError            a model call failed (``model``, ``attempt``, ``retryable``,
        │                      ``attempts``)
        └── ScriptError        the scripted provider has no rule for the request
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.bus.errors import CorralError

if TYPE_CHECKING:
    from corral.bus import Attempt


class RouterError(CorralError):
    """A model call failed after its retries and fallbacks.

    Args:
        message: What went wrong.
        model: The last model tried.
        attempt: How many calls were made.
        retryable: Whether the whole step may succeed later (e.g. rate limits, outages).
        attempts: Every call made, in order, each with what it failed with.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        attempt: int = 1,
        retryable: bool = True,
        attempts: list[Attempt] | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.attempt = attempt
        self.retryable = retryable
        self.attempts: list[Attempt] = list(attempts or [])


class ScriptError(RouterError):
    """The scripted provider's rules do not cover a request."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message, model=model, retryable=False)

"""Errors raised by the router package.

The tree::

    CorralError                (bus.errors)
    └── RouterError            a model call failed (``model``, ``attempt``, ``retryable``)
        └── ScriptError        the scripted provider has no rule for the request
"""

from __future__ import annotations

from corral.bus.errors import CorralError


class RouterError(CorralError):
    """A model call failed after its retries and fallbacks.

    Args:
        message: What went wrong.
        model: The last model tried.
        attempt: How many calls were made.
        retryable: Whether the whole step may succeed later (e.g. rate limits, outages).
    """

    def __init__(
        self, message: str, *, model: str | None = None, attempt: int = 1, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.model = model
        self.attempt = attempt
        self.retryable = retryable


class ScriptError(RouterError):
    """The scripted provider's rules do not cover a request."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message, model=model, retryable=False)

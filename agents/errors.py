"""Errors raised by the agents package.

The tree::

    CorralError                  (bus.errors)
    └── AgentError               an agent could not complete a step (``agent``, ``retryable``)
        └── DecisionError        the model's turns cannot be acted on (after corrections),
                                 or a call it made is over a limit
"""

from __future__ import annotations

from corral.bus.errors import CorralError


class AgentError(CorralError):
    """An agent could not complete a step.

    Args:
        message: What went wrong.
        agent: The agent's name.
        retryable: Whether redelivering the step may succeed.
    """

    def __init__(self, message: str, *, agent: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.agent = agent
        self.retryable = retryable


class DecisionError(AgentError):
    """The model's turn cannot be acted on: it stayed malformed after the corrections it was
    given, or a call it made is over a limit. Never retryable (the journal would answer the
    same turn again)."""

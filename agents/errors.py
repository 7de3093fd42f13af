"""Errors raised by the agents package.

The tree::

    CorralError                  (bus.errors)
    └── AgentError               an agent could not complete a step (``agent``, ``retryable``)
        └── DecisionError        the model's answer is not a valid decision
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.bus.errors import CorralError

if TYPE_CHECKING:
    from corral.bus import JournalEntry


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
    """The model's answer is not a handoff or reply corral understands.

    ``response`` is the answer as it is to be journaled (it was asked for, and paid for),
    or None if it was journaled before.
    """

    response: JournalEntry | None = None

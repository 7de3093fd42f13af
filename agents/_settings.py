"""What an agent runs with: its role, its edges, its tiers and its limits, as configured."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from corral.bus import Limits


@dataclass(frozen=True, kw_only=True)
class HandoffEdge:
    """An edge of the graph from this agent, as its model is offered it."""

    target: str
    payload_schema: dict[str, Any] | None = None
    """JSON Schema of the payload the target needs (None: a ``reason``)."""
    min_confidence: float = 0.5
    """Below this, the answer is asked again on the next stronger tier."""


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """One agent's role, as configured.

    Attributes:
        name: The agent's name; also its subject token and NATS identity.
        instructions: The system prompt.
        edges: The graph's edges from this agent.
    """

    name: str
    instructions: str
    edges: list[HandoffEdge] = field(default_factory=list)
    team: list[str] = field(default_factory=list)
    """Every agent of the team (a transfer to one the graph does not allow is refused by the
    supervisor, on the record; a transfer to a name that is no agent is told back)."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Tools the model may call: ``name``, ``description``, ``schema`` (JSON Schema)."""
    tiers: list[str] = field(default_factory=lambda: ["fast"])
    """The agent's model tier, then the stronger ones a low-confidence answer is asked
    again on, in order."""
    reply_min_confidence: float = 0.5
    """A reply below this is asked again on the next stronger tier."""
    max_tool_calls: int = 8
    """Tool calls allowed in one step before the step fails."""
    max_corrections: int = 2
    """Turns the model may redo after a malformed one (told what was wrong) before the
    step fails and the conversation is escalated."""
    tool_timeout_s: float = 30.0
    model_timeout_s: float = 300.0
    """How long one model call may take at the gateway, its retries and fallbacks included."""
    heartbeat_s: float = 10.0
    """How often a long step tells JetStream it is still working (a third of ack_wait)."""
    max_in_flight: int = 512
    """Steps served at once: a step mostly waits on its model, so one process holds many."""
    max_deliver: int = 10
    limits: Limits = field(default_factory=Limits)
    """How big a step's outputs, tool arguments and journaled responses may be."""

    @property
    def handoff_targets(self) -> list[str]:
        """The agents this one may hand off to."""
        return [edge.target for edge in self.edges]


class AgentState(enum.Enum):
    """Lifecycle of an ``AgentService``."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"

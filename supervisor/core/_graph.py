"""What the supervisor's decisions are made of: the graph they enforce, the decision (what
to save, what to tell), and the escalation every refusal to go on ends in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from opentelemetry.trace import Span
from pydantic import BaseModel

from corral.bus import Limits, Message, spans
from corral.supervisor.store._store import ConversationRecord, StepRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Graph:
    """The handoff graph and limits the supervisor enforces."""

    entry: str
    edges: dict[str, list[str]]
    min_confidence: float
    max_steps: int
    max_pingpong: int = 3
    """Handoffs back and forth between the same two agents before the conversation stops."""
    edge_confidence: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """Thresholds of the edges that set their own, by (source, target)."""
    reply_confidence: Mapping[str, float] = field(default_factory=dict)
    """Thresholds of the agents that set their own for replies."""
    payloads: Mapping[tuple[str, str], type[BaseModel]] = field(default_factory=dict)
    """The payload models of the edges that declare one, by (source, target)."""
    escalate_to: str | None = None
    """Where a step below its threshold goes (None: a human)."""
    window_turns: int = 20
    """Earlier turns of the transcript a task carries (``conversation.window_turns``)."""
    idle_timeout_s: float = 1800.0
    """How long a conversation awaits its customer before it is closed."""
    max_running_per_client: int = 256
    """A client's share: its conversations running at once (``_admission``)."""

    def threshold(self, source: str, target: str | None) -> float:
        """The confidence a handoff ``source`` -> ``target`` (None: a reply of ``source``)
        needs."""
        if target is None:
            return self.reply_confidence.get(source, self.min_confidence)
        return self.edge_confidence.get((source, target), self.min_confidence)


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message to publish."""

    subject: str
    message: Message
    msg_id: str
    stored: bool = True
    """False: news for whoever listens (progress), published without storing."""


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to save and what to tell, for one input."""

    record: ConversationRecord | None
    """The conversation after the input (None: unchanged)."""
    steps: list[StepRecord] = field(default_factory=list)
    extra: list[Outgoing] = field(default_factory=list)
    """Messages only this transition sends (beyond ``outputs(record)``)."""


Act = Callable[[str, Callable[[ConversationRecord], Decision]], Awaitable[Decision]]
"""Decide on a conversation as it is now, save and publish (``Supervisor.act``)."""


def escalate(
    record: ConversationRecord,
    agent: str,
    reason: str,
    target: str | None = None,
    confidence: float | None = None,
) -> Decision:
    """``record`` escalated to a human by ``agent``, with the reason."""
    return Decision(
        record=record.evolve(status="escalated", reason=reason),
        steps=[
            StepRecord(
                step=record.step,
                agent=agent,
                kind="escalated",
                target=target,
                confidence=confidence,
                detail=reason,
            )
        ],
    )


def worst_case(limits: Limits, graph: Graph) -> int:
    """The biggest task or outcome the limits allow, with room for ids, names and headers."""
    path = graph.max_steps * (limits.reason_bytes + 256)
    task = limits.customer_text_bytes + limits.customer_id_bytes + path
    outcome = limits.reply_text_bytes + limits.reason_bytes + path
    return max(task, outcome) + 1024


def log_transition(record: ConversationRecord) -> None:
    """Log where a decision left the conversation (its next step at debug, an outcome at info)."""
    if record.status == "running":
        logger.debug("conversation %s step %d -> %s", record.id, record.step, record.current_agent)
    else:
        logger.info("conversation %s %s: %s", record.id, record.status, record.reason or "replied")


def annotate_decision(span: Span, decision: Decision) -> None:
    """What the supervisor decided, on its decision's span."""
    record = decision.record
    if record is None:
        spans.annotate(span, decision="rejected" if decision.steps else "unchanged")
        return
    spans.annotate(span, decision=record.status, next_agent=record.current_agent, step=record.step)

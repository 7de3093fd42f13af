"""The bus's plain configuration, importable without NATS: what arrives at corral's edges may
weigh (``Limits``) and how streams and consumers are set up (``TopologyConfig``). The
config loader builds them; a command that only reads its config loads no NATS client."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How big what arrives at corral's edges may be, in bytes of UTF-8 (``limits:`` in
    ``corral.yaml``). Whatever corral derives from an input (a task, an outcome, a journaled
    response) is built from parts bounded by these, and checked against the server's
    ``max_payload`` before it is sent."""

    customer_text_bytes: int = 16 * KiB
    """A conversation start's text."""
    customer_id_bytes: int = 256
    """A conversation start's customer id."""
    reply_text_bytes: int = 32 * KiB
    """An agent's reply to the customer."""
    reason_bytes: int = 4 * KiB
    """A handoff's, a failure's or a wait's reason."""
    response_text_bytes: int = 64 * KiB
    """A model response as journaled (the agent keeps its start if the model said more)."""
    tool_arguments_bytes: int = 16 * KiB
    """A tool call's arguments, encoded."""
    tool_result_bytes: int = 64 * KiB
    """A tool call's result, encoded."""
    dead_letter_body_bytes: int = 64 * KiB
    """The copy of a message kept in ``CORRAL_DLQ``; a longer body is cut, and its
    ``Corral-Dead-Truncated`` header gives the original size."""


@dataclass(frozen=True, kw_only=True)
class TopologyConfig:
    """Stream and consumer settings; the defaults suit one machine and small clusters."""

    replicas: int = 1
    """Stream replicas (3 on a 3-node cluster)."""
    duplicate_window_s: float = 120.0
    """How long ``Nats-Msg-Id`` deduplicates a republished message."""
    ack_wait_s: float = 30.0
    """How long a delivered message may stay unacknowledged before redelivery."""
    max_deliver: int = 10
    """Deliveries before a message is dead-lettered instead of retried."""
    max_ack_pending: int = 1000
    events_max_age_s: float = 7 * 24 * 3600.0
    dead_letter_max_age_s: float = 30 * 24 * 3600.0
    """How long ``CORRAL_DLQ`` keeps a dead letter."""
    dead_letter_max_bytes: int = 256 * 1024 * 1024
    """What ``CORRAL_DLQ`` holds at most; past it the oldest dead letters go first."""
    spans_max_age_s: float = 24 * 3600.0
    """How long ``CORRAL_SPANS`` keeps spans no writer stored yet."""
    spans_max_bytes: int = 512 * 1024 * 1024
    """What ``CORRAL_SPANS`` holds at most; past it the oldest spans go first."""
    dead_letter_max_msg_bytes: int = 128 * 1024
    """The biggest message ``CORRAL_DLQ`` takes (corral cuts the bodies it copies to
    ``limits.dead_letter_body_bytes``; anyone else's bigger message is refused)."""

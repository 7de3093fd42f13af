"""The API's request and response bodies: pydantic models that validate what comes in and
describe what goes out; the OpenAPI document is generated from these same models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.bus._operator_messages import NO_NUL

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StartRequest(_Body):
    """A customer's first message: a new conversation."""

    text: str = Field(min_length=1, max_length=16384, description="What the customer says.")
    customer: str | None = Field(
        default=None,
        max_length=256,
        pattern=NO_NUL,
        description="The customer it is for. A key bound to a customer may name only that one "
        "(or none: it is the key's).",
    )
    dry_run: bool = Field(default=False, description="Policy-check and simulate every tool call.")


class Started(_Body):
    conversation: str
    status: Literal["started", "queued"] = Field(
        default="started",
        description="started (201): the supervisor recorded it; queued (202): not yet, behind others",
    )
    events: str = Field(description="Where its events stream (Server-Sent Events).")


class MessageRequest(_Body):
    """The customer's next message, in a conversation that awaits it."""

    text: str = Field(min_length=1, max_length=16384)
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="The message's id, chosen by the client: the same id twice is one turn.",
    )


class MessageSent(_Body):
    conversation: str
    message_id: str
    status: Literal["sent"] = "sent"


class Hop(_Body):
    agent: str
    confidence: float | None = None
    reason: str = ""
    payload: dict[str, object] = Field(default_factory=dict)


class Turn(_Body):
    role: Literal["customer", "agent", "human"]
    text: str
    agent: str = ""


class PendingApproval(_Body):
    id: str
    tool: str
    approver: str
    reason: str = ""


class Conversation(_Body):
    """A conversation as its client sees it."""

    conversation: str
    status: str
    customer: str
    current_agent: str
    path: list[Hop]
    transcript: list[Turn]
    reply: str | None = None
    reason: str | None = None
    pending_approval: PendingApproval | None = None
    cost_usd: float = 0.0
    created_at: float
    updated_at: float


class QueueItem(_Body):
    conversation: str
    status: Literal["escalated", "awaiting_customer"] = Field(
        description="escalated: waiting for an operator; awaiting_customer: an operator answered "
        "and the customer has not yet (the holder may follow up, hand back or close)"
    )
    customer: str
    reason: str | None
    since: str
    claimed_by: str | None
    claim_expires_at: str | None
    last_turn: str | None


class Queue(_Body):
    """The human queue, oldest first: escalated conversations, and those an operator answered."""

    items: list[QueueItem]


class Approval(_Body):
    id: str
    conversation: str
    customer: str
    agent: str
    tool: str
    arguments: dict[str, object]
    approver: str
    policy_ids: list[str]


class Approvals(_Body):
    """The pending approvals, oldest first."""

    items: list[Approval]


class VerdictRequest(_Body):
    reason: str = Field(
        default="", max_length=4096, pattern=NO_NUL, description="Why (a denial's reason reaches the agent)."
    )


class VerdictDone(_Body):
    approval: str
    status: Literal["approved", "denied"]


class OperatorActionRequest(_Body):
    """What an operator's action carries: the reply's text, the handback's agent and note,
    the close's note."""

    text: str = Field(default="", max_length=16384, pattern=NO_NUL)
    agent: str = Field(default="", max_length=64, pattern=NO_NUL)
    note: str = Field(default="", max_length=4096, pattern=NO_NUL)


class OperatorActionDone(_Body):
    conversation: str
    action: Literal["claim", "reply", "handback", "close"]
    status: Literal["ok"] = "ok"
    claimed_by: str | None = None
    claim_expires_at: float | None = None


class SwitchBody(_Body):
    reason: str = Field(
        default="", max_length=4096, pattern=NO_NUL, description="Why (shown to everyone it affects)."
    )


class SwitchDone(_Body):
    target: Literal["agent", "conversation"]
    name: str
    status: Literal["killed", "revived", "not killed"]


class Problem(_Body):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""

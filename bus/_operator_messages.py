"""Wire types of the operators' requests to the supervisor: taking an escalated
conversation from the human queue, answering its customer, handing it back, closing it;
deciding an approval; killing and reviving."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

OperatorAction = Literal["claim", "reply", "handback", "close"]
NO_NUL = "^[^\\x00]*$"
"""The pattern of free text PostgreSQL can store: no NUL character."""
OperatorText = Annotated[str, msgspec.Meta(pattern=NO_NUL)]
"""What an operator writes: anything PostgreSQL can store (no NUL), for the audit chain and
the transcript; a request holding a NUL does not decode, and is refused with why."""


class OperatorRequest(msgspec.Struct, frozen=True, kw_only=True, tag="operator.request"):
    """An operator acts on a conversation in the human queue (``corral.operator.requests``,
    request/reply; only operators may publish there)."""

    v: int = 1
    action: OperatorAction
    conversation: OperatorText
    by: OperatorText
    """The operator's name, as the audit chain records it."""
    id: OperatorText
    """The request's id, chosen by its sender: the same id twice is one action."""
    text: OperatorText = ""
    """``reply``: what the customer is told."""
    agent: OperatorText = ""
    """``handback``: the agent the conversation goes back to."""
    note: OperatorText = ""
    """``handback``: what the agent is told; ``close``: why."""


class ApprovalVerdict(msgspec.Struct, frozen=True, kw_only=True, tag="operator.approval"):
    """An operator, or the conversation's customer, grants or denies a pending approval
    (``corral.operator.requests``)."""

    v: int = 1
    approval_id: OperatorText
    approve: bool
    by: OperatorText
    reason: OperatorText = ""
    customer: OperatorText = ""
    """Set when the conversation's customer decides (an approval whose policy names
    ``@approver("customer")``): the customer the API found the client's key may act for,
    in the conversation the approval belongs to. Empty: an operator decides."""


class SwitchRequest(msgspec.Struct, frozen=True, kw_only=True, tag="operator.switch"):
    """An operator kills an agent or a conversation, or revives an agent (for the API, whose
    identity holds no kill switches; `corral kill` and `corral revive` flip them
    themselves)."""

    v: int = 1
    target: Literal["agent", "conversation"]
    name: OperatorText
    by: OperatorText
    reason: OperatorText = ""
    revive: bool = False


OperatorInput = OperatorRequest | ApprovalVerdict | SwitchRequest
"""Everything on ``corral.operator.requests``."""


class OperatorAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="operator.answer"):
    """The supervisor's answer: done, or refused with the reason."""

    v: int = 1
    status: Literal["ok", "refused"]
    reason: str = ""
    claimed_by: str = ""
    """Who holds the conversation's claim now ("" if nobody)."""
    claim_expires_at: float = 0.0
    """When that claim lapses (Unix seconds), and the conversation returns to the queue."""

"""Wire types of the operators' requests to the supervisor: taking an escalated
conversation from the human queue, answering its customer, handing it back, closing it."""

from __future__ import annotations

from typing import Literal

import msgspec

OperatorAction = Literal["claim", "reply", "handback", "close"]


class OperatorRequest(msgspec.Struct, frozen=True, kw_only=True, tag="operator.request"):
    """An operator acts on a conversation in the human queue (``corral.operator.requests``,
    request/reply; only operators may publish there)."""

    v: int = 1
    action: OperatorAction
    conversation: str
    by: str
    """The operator's name, as the audit chain records it."""
    id: str
    """The request's id, chosen by its sender: the same id twice is one action."""
    text: str = ""
    """``reply``: what the customer is told."""
    agent: str = ""
    """``handback``: the agent the conversation goes back to."""
    note: str = ""
    """``handback``: what the agent is told; ``close``: why."""


class ApprovalVerdict(msgspec.Struct, frozen=True, kw_only=True, tag="operator.approval"):
    """An operator grants or denies a pending approval (``corral.operator.requests``)."""

    v: int = 1
    approval_id: str
    approve: bool
    by: str
    reason: str = ""


OperatorInput = OperatorRequest | ApprovalVerdict
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

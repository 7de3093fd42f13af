"""Human (or role) decisions on approval requests filed by the tool gateway.

An approval is bound to the hash of one exact action (conversation, customer, agent,
tool, arguments), is single-use, and expires by the database's clock. Only the operator
identity reaches these functions (the CLI, with the database's credentials); no agent
can grant anything, whatever it publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from corral.bus.errors import CorralError


class ApprovalError(CorralError):
    """An approval cannot be decided (unknown, already decided, expired, or its
    conversation or agent is no longer alive)."""


_ALIVE = ("running", "waiting")
"""Conversation states in which a granted approval can still be used."""


@dataclass(frozen=True, kw_only=True)
class ApprovalRecord:
    """One approval request and its state."""

    id: str
    conversation: str
    customer: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    approver: str
    policy_ids: list[str]
    status: str
    decided_by: str | None
    reason: str | None
    expired: bool


_COLUMNS = (
    "id, conversation, customer, agent, tool, arguments::text AS arguments, approver, policy_ids,"
    " status, decided_by, reason, expires_at <= now() AS expired"
)


def _from_row(row: asyncpg.Record) -> ApprovalRecord:
    return ApprovalRecord(
        **{**dict(row), "arguments": json.loads(row["arguments"]), "policy_ids": list(row["policy_ids"])}
    )


async def pending_approvals(pool: asyncpg.Pool) -> list[ApprovalRecord]:
    """Approval requests waiting for a decision, oldest first."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM approvals WHERE status='pending' AND expires_at > now() ORDER BY created_at"
    )
    return [_from_row(r) for r in rows]


async def decide_approval(
    pool: asyncpg.Pool, approval_id: str, *, approve: bool, by: str, reason: str = ""
) -> ApprovalRecord:
    """Grant or deny a pending approval.

    A grant needs its conversation alive (running, or waiting on it) and its agent not
    killed: an approval of a dead conversation is refused, and stays pending until it
    expires. A denial is always recorded.

    Raises:
        ApprovalError: if it does not exist, was decided already, or expired, or (to grant)
            its conversation ended or was killed, or its agent was killed.
    """
    row = await pool.fetchrow(
        "UPDATE approvals SET status=$2, decided_by=$3, reason=$4, decided_at=now()"
        " WHERE id=$1 AND status='pending' AND expires_at > now()"
        " AND (NOT $5 OR (EXISTS (SELECT 1 FROM conversations c WHERE c.id=approvals.conversation"
        "  AND c.status = ANY($6::text[]))"
        "  AND NOT EXISTS (SELECT 1 FROM agent_controls k WHERE k.agent=approvals.agent"
        "  AND k.killed_at IS NOT NULL)))"
        f" RETURNING {_COLUMNS}",
        approval_id,
        "approved" if approve else "denied",
        by,
        reason,
        approve,
        list(_ALIVE),
    )
    if row is not None:
        return _from_row(row)
    existing = await pool.fetchrow(
        f"SELECT {_COLUMNS}, (SELECT c.status FROM conversations c WHERE c.id=a.conversation)"
        " AS conversation_status, (SELECT k.reason FROM agent_controls k WHERE k.agent=a.agent"
        " AND k.killed_at IS NOT NULL) AS agent_killed FROM approvals a WHERE id=$1",
        approval_id,
    )
    if existing is None:
        raise ApprovalError(f"no approval {approval_id!r}")
    if existing["expired"]:
        raise ApprovalError(f"approval {approval_id} expired")
    if existing["status"] != "pending":
        raise ApprovalError(f"approval {approval_id} is already {existing['status']}")
    if existing["conversation_status"] not in _ALIVE:
        state = existing["conversation_status"] or "gone"
        raise ApprovalError(
            f"approval {approval_id} cannot be granted: conversation {existing['conversation']} is {state}"
        )
    raise ApprovalError(
        f"approval {approval_id} cannot be granted: agent {existing['agent']} is killed"
        f" ({existing['agent_killed']})"
    )

"""Approvals, all their SQL: the gateway consumes a granted one or files a request, and a
human (or role) decides requests.

An approval is bound to the hash of one exact action (conversation, customer, agent,
tool, arguments), is single-use, and expires by the database's clock. Only the operator
identity reaches these functions (the CLI, with the database's credentials); no agent
can grant anything, whatever it publishes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from corral.bus.errors import CorralError


class ApprovalError(CorralError):
    """An approval cannot be decided (unknown, already decided, expired, or its
    conversation or agent is no longer alive)."""


class ApprovalDenied(Exception):
    """A human denied this exact action: the call is denied, naming the approval."""

    def __init__(self, approval_id: str, message: str) -> None:
        super().__init__(message)
        self.approval_id = approval_id


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


CUSTOMER = "customer"
"""The approver that is the conversation's own customer: only they decide (through the API)."""


def decider_problem(
    approver: str,
    by: str,
    approvers: Mapping[str, Sequence[str]],
    *,
    customer: str = "",
    owner: str = "",
) -> str | None:
    """Why ``by`` may not decide an approval of ``approver`` (None: they may): the role's
    deciders are ``approvers[approver]`` when it is listed (``tools.approvers``), any
    operator when it is not. An approval of ``@approver("customer")`` is decided by its
    conversation's customer (``owner``) alone: ``customer`` is who decides when a customer
    does (empty: an operator)."""
    if approver == CUSTOMER:
        if not customer:
            return (
                "it is the customer's to decide, not an operator's (through the API, with their client's key)"
            )
        return None if customer == owner else "it is not this customer's to decide"
    if customer:
        return f"it is for {approver} to decide, not the customer"
    allowed = approvers.get(approver)
    if allowed is None or by in allowed:
        return None
    deciders = ", ".join(allowed) or "nobody"
    return f"{by} may not decide for {approver} (tools.approvers.{approver}: {deciders})"


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


def action_hash(conversation: str, customer: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """The identity of one exact action: an approval is bound to it."""
    canonical = json.dumps(
        {
            "conversation": conversation,
            "customer": customer,
            "agent": agent,
            "tool": tool,
            "arguments": arguments,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ApprovalAsk:
    """What a call that needs approval asks for: the action and who may approve it."""

    conversation: str
    customer: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    approver: str
    policy_ids: Sequence[str]

    @property
    def digest(self) -> str:
        return action_hash(self.conversation, self.customer, self.agent, self.tool, self.arguments)


async def consume_or_file(
    conn: asyncpg.Connection, ask: ApprovalAsk, *, ttl: timedelta, max_pending: int
) -> tuple[str | None, bool]:
    """(approval id, granted), in the call's transaction. A granted, unexpired, unused approval
    of this exact action is consumed (approvals are single-use); else the pending one is
    named, or a new request filed; (None, False) when the queue is full.

    Raises:
        ApprovalDenied: a human denied this action.
    """
    digest = ask.digest
    used = await conn.fetchval(
        "UPDATE approvals SET status='used', used_at=now() WHERE id = ("
        " SELECT id FROM approvals WHERE action_hash=$1 AND status='approved' AND expires_at > now()"
        " ORDER BY decided_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
        digest,
    )
    if used is not None:
        return used, True
    refused = await conn.fetchrow(
        "SELECT id, decided_by, reason FROM approvals WHERE action_hash=$1 AND status='denied'"
        " ORDER BY decided_at DESC LIMIT 1",
        digest,
    )
    if refused is not None:
        raise ApprovalDenied(
            refused["id"],
            f"approval {refused['id']} was denied by {refused['decided_by']}: {refused['reason']}",
        )
    pending = await conn.fetchval(
        "SELECT id FROM approvals WHERE action_hash=$1 AND status='pending' AND expires_at > now()", digest
    )
    if pending is not None:
        return pending, False
    queued = await conn.fetchval(
        "SELECT count(*) FROM approvals WHERE status='pending' AND expires_at > now()"
    )
    if queued >= max_pending:
        return None, False
    return await _file(conn, ask, digest, ttl), False


async def _file(conn: asyncpg.Connection, ask: ApprovalAsk, digest: str, ttl: timedelta) -> str:
    approval_id = f"a-{secrets.token_hex(6)}"
    await conn.execute(
        "INSERT INTO approvals (id, action_hash, conversation, customer, agent, tool, arguments,"
        " approver, policy_ids, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9, now() + $10)",
        approval_id,
        digest,
        ask.conversation,
        ask.customer,
        ask.agent,
        ask.tool,
        json.dumps(ask.arguments),
        ask.approver,
        list(ask.policy_ids),
        ttl,
    )
    return approval_id


async def keep_used(conn: asyncpg.Connection, approval_id: str) -> None:
    """A granted approval that a failed body had consumed stays used (its first transaction
    rolled back)."""
    await conn.execute(
        "UPDATE approvals SET status='used', used_at=now() WHERE id=$1 AND status='approved'", approval_id
    )

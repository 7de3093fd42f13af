"""What the operator reads about conversations: one conversation whole (its record, the
supervisor's decisions, every tool call's outcome, its approvals), the list of them, and
whether an id exists. Read-only queries, for ``corral show`` and ``corral conversations``.

A conversation's tool outcomes are the tool ledger's (``tool_ledger``): the gateway
records every final decision on a call there, failures included, with the reason the
agent was told (``refund -> error: refund exceeds the order's remaining 0 cents``). A call
waiting for a human is not final yet: it shows as its approval (``approvals``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from corral.supervisor.config._sections import HUMAN
from corral.supervisor.store._store import _COLUMNS, ConversationRecord, StepRecord, _from_row


@dataclass(frozen=True, kw_only=True)
class ToolOutcome:
    """One tool call as the gateway decided it, from the ledger."""

    step: int
    agent: str
    tool: str
    arguments: dict[str, Any]
    status: str
    reason: str
    policy_ids: list[str]
    approval_id: str | None
    result: dict[str, Any]
    rolled_back: bool
    at: datetime


@dataclass(frozen=True, kw_only=True)
class ApprovalState:
    """One approval the conversation asked for, and where it stands."""

    id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    approver: str
    status: str
    decided_by: str | None
    reason: str | None
    expired: bool


@dataclass(frozen=True, kw_only=True)
class Spend:
    """What a conversation's model calls cost, from the step journal (``conversation_spend``)."""

    model_calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ModelCallRecord:
    """One model answer of a step, as the model gateway journaled it (every attempt of a
    low-confidence answer on each tier is one)."""

    step: int
    index: int
    agent: str
    tier: str
    model: str
    confidence: float | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    calls: list[str]
    """The tools the answer called, in order."""
    attempts: int
    """HTTP calls made for it, retries and fallbacks included (0: not recorded)."""


@dataclass(frozen=True, kw_only=True)
class ConversationReport:
    """A conversation whole, as ``corral show`` prints it."""

    record: ConversationRecord
    created_at: datetime
    updated_at: datetime
    steps: list[StepRecord] = field(default_factory=list)
    tools: list[ToolOutcome] = field(default_factory=list)
    approvals: list[ApprovalState] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Messages the supervisor dropped because of a kill switch, as ``agent: reason``."""
    spend: Spend = field(default_factory=Spend)
    model_calls: list[ModelCallRecord] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ConversationSummary:
    """One line of ``corral conversations``."""

    id: str
    status: str
    customer: str
    path: list[str]
    created_at: datetime
    updated_at: datetime
    text: str
    current_agent: str = ""
    cost_usd: float = 0.0
    model_calls: int = 0


async def conversation_exists(conn: asyncpg.Connection | asyncpg.Pool, conversation: str) -> bool:
    """Whether the supervisor recorded a conversation with this id (False before corral's
    tables exist)."""
    if not await _migrated(conn):
        return False
    found = await conn.fetchval("SELECT 1 FROM conversations WHERE id=$1", conversation)
    return found is not None


async def conversation_report(
    conn: asyncpg.Connection | asyncpg.Pool, conversation: str
) -> ConversationReport | None:
    """The conversation whole, or None if there is none with this id."""
    if not await _migrated(conn):
        return None
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS}, created_at, updated_at FROM conversations WHERE id=$1", conversation
    )
    if row is None:
        return None
    steps = await conn.fetch(
        "SELECT step, agent, kind, target, confidence, detail FROM conversation_steps"
        " WHERE conversation=$1 ORDER BY id",
        conversation,
    )
    tools = await conn.fetch(
        "SELECT CASE WHEN split_part(idempotency_key, ':', 2) ~ '^[0-9]{1,9}$'"
        " THEN split_part(idempotency_key, ':', 2)::int ELSE 0 END AS step,"
        " agent, tool, arguments::text AS arguments, status, reason, policy_ids, approval_id,"
        " result::text AS result,"
        " rolled_back_at IS NOT NULL AS rolled_back, created_at AS at"
        " FROM tool_ledger WHERE conversation=$1 ORDER BY created_at, idempotency_key",
        conversation,
    )
    approvals = await conn.fetch(
        "SELECT id, agent, tool, arguments::text AS arguments, approver, status, decided_by, reason,"
        " expires_at <= now() AS expired FROM approvals WHERE conversation=$1 ORDER BY created_at",
        conversation,
    )
    dropped = await conn.fetch(
        "SELECT agent, reason FROM dropped_messages WHERE conversation=$1 ORDER BY id", conversation
    )
    spent = await conn.fetchrow(
        "SELECT model_calls, tokens, cost_usd::float8 AS cost_usd FROM conversation_spend"
        " WHERE conversation=$1",
        conversation,
    )
    journal = await conn.fetch(
        "SELECT step, idx AS index, agent, tier, model, confidence, input_tokens, output_tokens,"
        " cost_usd, ARRAY(SELECT c->>'name' FROM jsonb_array_elements(tool_calls) c) AS calls,"
        " jsonb_array_length(attempts) AS attempts"
        " FROM step_journal WHERE conversation=$1 ORDER BY step, idx",
        conversation,
    )
    record = {k: row[k] for k in row.keys() if k not in ("created_at", "updated_at")}
    return ConversationReport(
        record=_from_row(record),  # type: ignore[arg-type]
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        steps=[StepRecord(**dict(s)) for s in steps],
        tools=[
            ToolOutcome(
                **{
                    **dict(t),
                    "arguments": json.loads(t["arguments"]),
                    "result": json.loads(t["result"]),
                    "policy_ids": list(t["policy_ids"]),
                }
            )
            for t in tools
        ],
        approvals=[ApprovalState(**{**dict(a), "arguments": json.loads(a["arguments"])}) for a in approvals],
        dropped=[f"{d['agent']}: {d['reason']}" for d in dropped],
        spend=Spend(**dict(spent)) if spent is not None else Spend(),
        model_calls=[ModelCallRecord(**{**dict(j), "calls": list(j["calls"])}) for j in journal],
    )


async def recent_conversations(
    conn: asyncpg.Connection | asyncpg.Pool, *, status: str | None = None, limit: int = 20
) -> list[ConversationSummary]:
    """Conversations newest first, of one ``status`` if given, at most ``limit``."""
    if not await _migrated(conn):
        return []
    rows = await conn.fetch(
        "SELECT c.id, c.status, c.customer, c.path::text AS path, c.created_at, c.updated_at, c.text,"
        " c.current_agent, coalesce(s.cost_usd, 0)::float8 AS cost_usd,"
        " coalesce(s.model_calls, 0) AS model_calls"
        " FROM (SELECT * FROM conversations WHERE $1::text IS NULL OR status = $1"
        "       ORDER BY created_at DESC, id DESC LIMIT $2) c"
        " LEFT JOIN conversation_spend s ON s.conversation = c.id"
        " ORDER BY c.created_at DESC, c.id DESC",
        status,
        limit,
    )
    return [
        ConversationSummary(**{**dict(r), "path": [hop["agent"] for hop in json.loads(r["path"])]})
        for r in rows
    ]


async def _migrated(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    # A database corral never started on has none of its tables: it holds no conversation.
    return bool(await conn.fetchval("SELECT to_regclass('conversations') IS NOT NULL"))


_QUEUE = """
SELECT c.id, c.customer, c.reason, c.updated_at, c.status,
    CASE WHEN k.expires_at > now() THEN k.claimed_by END AS claimed_by,
    CASE WHEN k.expires_at > now() THEN k.expires_at END AS claim_expires_at,
    c.turns -> -1 ->> 'text' AS last_turn
FROM conversations c LEFT JOIN conversation_claims k ON k.conversation = c.id
WHERE c.status = 'escalated' OR (c.status = 'awaiting_customer' AND c.current_agent = $2)
ORDER BY c.updated_at
LIMIT $1
"""


async def human_queue(conn: asyncpg.Connection | asyncpg.Pool, limit: int = 100) -> list[dict[str, Any]]:
    """The human queue, oldest first: escalated conversations, and those an operator
    answered whose customer has not answered yet (``status`` ``awaiting_customer``: the
    operator holding the claim may follow up, hand back or close meanwhile), with the
    reason, who holds each (a live claim) and the transcript's last turn; JSON-ready."""
    if not await conn.fetchval("SELECT to_regclass('conversation_claims') IS NOT NULL"):
        return []
    return [
        {
            "conversation": r["id"],
            "status": r["status"],
            "customer": r["customer"],
            "reason": r["reason"],
            "since": r["updated_at"].isoformat(),
            "claimed_by": r["claimed_by"],
            "claim_expires_at": r["claim_expires_at"].isoformat() if r["claim_expires_at"] else None,
            "last_turn": r["last_turn"],
        }
        for r in await conn.fetch(_QUEUE, limit, HUMAN)
    ]

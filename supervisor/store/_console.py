"""What the console shows, read from PostgreSQL for the API's desk: the conversations, one
conversation's trace beside its transcript, the handoff graph's counts, the agents, the
recent alerts; and the one-time logins that give an operator the console."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from corral.supervisor.store._trace_report import conversation_trace

_CONVERSATIONS = """
SELECT c.id, c.client, c.customer, c.status, c.current_agent, c.step, c.reason,
    extract(epoch FROM c.created_at)::float8 AS created_at,
    extract(epoch FROM c.updated_at)::float8 AS updated_at,
    coalesce(s.cost_usd, 0)::float8 AS cost_usd
FROM (SELECT * FROM conversations
      WHERE ($1 = '' OR status = $1) AND ($2 = '' OR current_agent = $2)
      ORDER BY created_at DESC, id DESC LIMIT $3) c
LEFT JOIN conversation_spend s ON s.conversation = c.id
ORDER BY c.created_at DESC, c.id DESC
"""

_STEPS = """
SELECT step, agent, kind, target, confidence, detail, extract(epoch FROM created_at)::float8 AS at
FROM conversation_steps WHERE conversation = $1 ORDER BY id
"""

_TOOLS = """
SELECT idempotency_key, agent, tool, status, reason, policy_ids, approval_id,
    extract(epoch FROM created_at)::float8 AS at
FROM tool_ledger WHERE conversation = $1 ORDER BY created_at
"""

_GRAPH = """
SELECT agent, target,
    count(*) FILTER (WHERE kind = 'forwarded')::int AS handoffs,
    count(*) FILTER (WHERE kind IN ('refused', 'rejected'))::int AS refusals
FROM conversation_steps
WHERE target IS NOT NULL AND created_at > now() - make_interval(hours => $1)
GROUP BY agent, target
"""

_AGENTS = """
SELECT a.agent, a.killed_at IS NOT NULL AS killed, coalesce(a.reason, '') AS reason,
    coalesce(a.by, '') AS killed_by,
    (SELECT count(*) FROM step_journal j
      WHERE j.agent = a.agent AND j.created_at > now() - interval '1 minute')::int AS calls_per_minute,
    (SELECT coalesce(sum(j.cost_usd), 0) FROM step_journal j
      WHERE j.agent = a.agent AND j.created_at > date_trunc('day', now()))::float8 AS spend_today_usd,
    (SELECT count(*) FROM conversations c
      WHERE c.current_agent = a.agent AND c.status = 'running')::int AS running
FROM agent_controls a ORDER BY a.agent
"""

_REDEEM = """
UPDATE console_logins SET used_at = now()
WHERE digest = $1 AND used_at IS NULL AND expires_at > now()
RETURNING operator
"""

_GRANT = """
INSERT INTO api_keys (id, digest, client, customer, operator, created_by)
VALUES ($1, $2, $3, NULL, true, 'console login')
"""


async def conversations(
    conn: asyncpg.Connection, *, status: str, agent: str, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(_CONVERSATIONS, status, agent, max(1, min(limit, 500)))
    return [dict(r) for r in rows]


async def trace(conn: asyncpg.Connection, conversation: str) -> list[dict[str, Any]]:
    """One item: the conversation's spans (as trees), its decisions, its tool calls and its
    transcript (empty if there is no such conversation)."""
    turns = await conn.fetchval("SELECT turns::text FROM conversations WHERE id = $1", conversation)
    if turns is None:
        return []
    spans = await conversation_trace(conn, conversation)
    steps = [dict(r) for r in await conn.fetch(_STEPS, conversation)]
    tools = [dict(r) for r in await conn.fetch(_TOOLS, conversation)]
    return [
        {
            "conversation": conversation,
            "transcript": json.loads(turns),
            "spans": [span.document() for span in spans],
            "steps": steps,
            "tools": [{**t, "policy_ids": list(t["policy_ids"] or [])} for t in tools],
        }
    ]


async def graph_counts(conn: asyncpg.Connection, hours: float = 24.0) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(_GRAPH, hours)]


async def agents(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(_AGENTS)]


async def redeem_login(
    conn: asyncpg.Connection, login_digest: str, key_id: str, key_digest: str
) -> str | None:
    """The operator a one-time login was for, with the new key stored as theirs; None if
    the login is unknown, used or expired."""
    async with conn.transaction():
        operator = await conn.fetchval(_REDEEM, login_digest)
        if operator is None:
            return None
        await conn.execute(_GRANT, key_id, key_digest, operator)
        return str(operator)


async def recent_alerts(conn: asyncpg.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The newest alerts first (none where corral's tables are not there yet)."""
    if not await conn.fetchval("SELECT to_regclass('alerts') IS NOT NULL"):
        return []
    rows = await conn.fetch(
        "SELECT id, kind, agent, conversation, model, reason, action,"
        " extract(epoch FROM created_at)::float8 AS at FROM alerts ORDER BY id DESC LIMIT $1",
        max(1, min(limit, 500)),
    )
    return [dict(r) for r in rows]


LOGIN_PREFIX = "cl_"


async def create_login(conn: asyncpg.Connection, operator: str, ttl_s: float) -> str:
    """A one-time console login for ``operator``, valid for ``ttl_s``: shown once, stored
    as its SHA-256 only."""
    import hashlib
    import secrets

    login = f"{LOGIN_PREFIX}{secrets.token_urlsafe(32)}"
    await conn.execute(
        "INSERT INTO console_logins (digest, operator, expires_at)"
        " VALUES ($1, $2, now() + make_interval(secs => $3))",
        hashlib.sha256(login.encode()).hexdigest(),
        operator,
        ttl_s,
    )
    return login

"""Agent kill switches as the gateway and the journal see them: rows in PostgreSQL.

The KV switch (``bus.set_kill``) tells the supervisor and revokes the agent's identity; it
travels over NATS and takes effect when its watchers see it. These rows take effect at
once for every tool call: the gateway reads its caller's row ``FOR SHARE`` in the
statement that takes the call's locks, so ``kill_agent`` (an ``UPDATE``) waits for the
calls in flight and every call after it commits sees the kill. An agent cannot blind this:
it reaches the database only through the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

KILLED_SQL = (
    "(SELECT CASE WHEN c.killed_at IS NOT NULL THEN coalesce(c.reason, 'killed') END"
    " FROM agent_controls c WHERE c.agent={0} FOR SHARE)"
)
"""A SQL expression: why agent ``{0}`` is killed, or NULL. It locks the agent's row (share;
a row is locked only if the WHERE clause selects it, so it tests the kill in the select
list) until the transaction ends: a kill waits for the statement's transaction, and a
read that waited for a kill re-reads the row the kill wrote (READ COMMITTED)."""


async def ensure_agent_controls(conn: asyncpg.Connection | asyncpg.Pool, agents: Iterable[str]) -> None:
    """Make sure every agent has a row (a kill of an agent without one would wait for no one)."""
    await conn.execute(
        "INSERT INTO agent_controls (agent) SELECT unnest($1::text[]) ON CONFLICT (agent) DO NOTHING",
        sorted(set(agents)),
    )


async def kill_agent(conn: asyncpg.Connection | asyncpg.Pool, agent: str, reason: str, by: str) -> None:
    """Kill ``agent`` for the gateway; returns once no call of it is in flight, and every call
    after sees the kill."""
    await conn.execute(
        "INSERT INTO agent_controls (agent, killed_at, reason, by) VALUES ($1, now(), $2, $3)"
        " ON CONFLICT (agent) DO UPDATE SET killed_at=excluded.killed_at, reason=excluded.reason,"
        " by=excluded.by",
        agent,
        reason,
        by,
    )


async def revive_agent(conn: asyncpg.Connection | asyncpg.Pool, agent: str) -> bool:
    """Clear ``agent``'s kill; False if it was not killed."""
    cleared = await conn.fetchval(
        "UPDATE agent_controls SET killed_at=NULL, reason=NULL, by=NULL"
        " WHERE agent=$1 AND killed_at IS NOT NULL RETURNING agent",
        agent,
    )
    return cleared is not None


async def agent_killed(conn: asyncpg.Connection | asyncpg.Pool, agent: str) -> str | None:
    """Why ``agent`` is killed, or None."""
    reason: str | None = await conn.fetchval(
        "SELECT coalesce(reason, 'killed') FROM agent_controls WHERE agent=$1 AND killed_at IS NOT NULL",
        agent,
    )
    return reason

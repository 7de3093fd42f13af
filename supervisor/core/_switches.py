"""An operator's kill or revive, flipped by the supervisor for the API (whose identity holds
no kill switches): the same two switches `corral kill` flips, in the same order, and the
action in the audit chain with the operator's name.

An agent's kill is first the gateway's row (``store._agent_controls``: it returns once no
call of the agent is in flight, and every call after it is refused), then the KV switch
that tells the supervisor and has the launcher revoke the agent's identity. A revive
clears both. A conversation's kill is its KV switch; a killed conversation stays ended.
"""

from __future__ import annotations

from collections.abc import Collection

import asyncpg
from nats.js import JetStreamContext

from corral.bus import OperatorAnswer, SwitchRequest, clear_kill, set_kill, subjects
from corral.supervisor.audit._audit import AuditEntry, append_audit, digest_arguments
from corral.supervisor.store._agent_controls import kill_agent, revive_agent
from corral.supervisor.store._reports import conversation_exists


async def flip_switch(
    pool: asyncpg.Pool, js: JetStreamContext, request: SwitchRequest, agents: Collection[str]
) -> OperatorAnswer:
    """Kill or revive what ``request`` names, or say why not (audited either way)."""
    why = await _problem(pool, request, agents)
    if why is not None:
        await _audit(pool, request, f"refused: {why}")
        return OperatorAnswer(status="refused", reason=why)
    reason = request.reason or "killed by an operator"
    if request.target == "agent":
        if request.revive:
            await revive_agent(pool, request.name)
        else:
            await kill_agent(pool, request.name, reason, request.by)
    note = ""
    if request.revive:
        if not await clear_kill(js, request.target, request.name):
            note = "was not killed"
    else:
        await set_kill(js, request.target, request.name, reason, by=request.by)
    await _audit(pool, request, f"applied: {note}" if note else "applied")
    return OperatorAnswer(status="ok", reason=note)


async def _problem(pool: asyncpg.Pool, request: SwitchRequest, agents: Collection[str]) -> str | None:
    if request.target == "agent":
        if request.name not in agents:
            return f"no agent {request.name!r} (the team's: {', '.join(sorted(agents))})"
        return None
    if not subjects.is_id(request.name) or not await conversation_exists(pool, request.name):
        return f"no conversation {request.name!r}"
    if request.revive:
        return f"conversation {request.name}: a killed conversation stays ended (only agents are revived)"
    return None


async def _audit(pool: asyncpg.Pool, request: SwitchRequest, outcome: str) -> None:
    verb = "revive" if request.revive else "kill"
    entry = AuditEntry(
        agent=request.by,
        credential_id="admin",
        on_behalf_of="",
        conversation=request.name if request.target == "conversation" else "",
        action=f"{verb}.{request.target}",
        arguments_digest=digest_arguments({"name": request.name, "reason": request.reason}),
        decision="operator",
        outcome=outcome,
        detail=request.name if request.target == "agent" else request.reason,
    )
    async with pool.acquire() as conn, conn.transaction():
        await append_audit(conn, entry)

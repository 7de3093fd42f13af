"""``corral rollback``: compensate a conversation's applied tool calls, newest first, each
exactly once, each undo run as a tool call's body is (as ``corral_tools``, under a deadline)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import asyncpg
from pydantic import BaseModel

from corral.supervisor.audit._audit import AuditEntry, append_audit, digest_arguments
from corral.supervisor.gateway._tool_body import ENTER_TOOLS, LEAVE_TOOLS
from corral.supervisor.gateway._tool_process import ProcessTool
from corral.supervisor.gateway._tool_runner import ToolRunner
from corral.supervisor.gateway._tools import Tool, ToolInput
from corral.supervisor.store._store import needs_reset


async def rollback(
    pool: asyncpg.Pool,
    tools: Mapping[str, Tool[Any]],
    conversation: str,
    operator: str,
    *,
    timeout_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Compensate a conversation's applied tool calls, newest first, each exactly once.

    Each undo runs in its own transaction with its ledger mark and audit record, so an
    interrupted rollback resumes where it stopped. An undo body runs as a tool call's does:
    as ``corral_tools``, through the ``ToolRunner`` under ``timeout_s``, in a child for a
    tool whose isolation is "process". Calls whose tool has no undo are reported as
    irreversible and left alone.

    Returns:
        One entry per applied call: tool, undo, outcome.

    Raises:
        ToolTimeoutError, ToolStatementError, Exception: an undo failed; it and everything
            after it are left for the next rollback.
    """
    report: list[dict[str, Any]] = []
    rows = await pool.fetch(
        "SELECT idempotency_key, agent, tool, arguments::text AS arguments, result::text AS result"
        " FROM tool_ledger WHERE conversation=$1 AND status='ok' AND rolled_back_at IS NULL"
        " ORDER BY created_at DESC, idempotency_key DESC",
        conversation,
    )
    runner = ToolRunner()
    processes: dict[str, ProcessTool] = {}
    try:
        for row in rows:
            tool = tools[row["tool"]]
            if not tool.changes_state:
                continue
            if tool.undo is None:
                report.append({"tool": tool.name, "undo": None, "outcome": "irreversible: left as is"})
                continue
            undo = tools[tool.undo]
            runnable = undo
            if undo.isolation == "process":
                if undo.name not in processes:
                    processes[undo.name] = ProcessTool(undo)
                runnable = processes[undo.name]
            arguments = undo.arguments.model_validate(
                tool.undo_arguments(json.loads(row["arguments"]), json.loads(row["result"]))
            )
            result = await _undo_one(
                pool, runner, runnable, arguments, row, conversation, operator, timeout_s
            )
            if result is not None:
                report.append({"tool": tool.name, "undo": undo.name, "outcome": result})
    finally:
        runner.close()
        for process in processes.values():
            await process.close()
    return report


async def _undo_one(
    pool: asyncpg.Pool,
    runner: ToolRunner,
    undo: Tool[Any],
    arguments: BaseModel,
    row: asyncpg.Record,
    conversation: str,
    operator: str,
    timeout_s: float,
) -> dict[str, Any] | None:
    """One undo with its ledger mark and audit record; None if another rollback got there first."""
    async with pool.acquire() as conn, conn.transaction():
        locked = await conn.fetchval(
            "SELECT 1 FROM tool_ledger WHERE idempotency_key=$1 AND rolled_back_at IS NULL FOR UPDATE",
            row["idempotency_key"],
        )
        if locked is None:
            return None
        customer = await conn.fetchval("SELECT customer FROM conversations WHERE id=$1", conversation)
        ctx = ToolInput(
            arguments=arguments,
            customer=customer,
            conversation=conversation,
            agent=row["agent"],
            idempotency_key=f"{row['idempotency_key']}:undo",
            conn=conn,
        )
        await conn.execute(ENTER_TOOLS)
        needs_reset(conn)
        result: dict[str, Any] = await runner.run(
            undo.name, undo.run, ctx, timeout_s, isolation=undo.isolation
        )
        await conn.execute(LEAVE_TOOLS)
        await conn.execute(
            "UPDATE tool_ledger SET rolled_back_at=now() WHERE idempotency_key=$1", row["idempotency_key"]
        )
        dumped = arguments.model_dump(mode="json")
        await append_audit(
            conn,
            AuditEntry(
                agent=operator,
                credential_id="admin",
                on_behalf_of=customer,
                conversation=conversation,
                action=undo.name,
                arguments_digest=digest_arguments(dumped),
                decision="rollback",
                outcome="applied" if "error" not in result else f"failed: {result['error']}",
                detail=f"compensates {row['tool']} {row['idempotency_key']}",
            ),
        )
    return result

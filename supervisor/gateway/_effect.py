"""A declared effect (``SqlTool``) as the gateway runs it: in one statement with the ledger
entry and the audit record of its success, under the call's deadline."""

from __future__ import annotations

from typing import Any

import asyncpg

from corral.bus import ToolCall
from corral.supervisor.audit._audit import APPEND_CALL, append_values
from corral.supervisor.gateway._policy import PolicyDecision
from corral.supervisor.gateway._records import CallRecord, audit_entry
from corral.supervisor.gateway._sql_tools import SqlTool, json_object
from corral.supervisor.gateway._statements import effect_with_records
from corral.supervisor.gateway._tool_body import check_result_size, raise_body_failure
from corral.supervisor.gateway._tool_runner import ToolTimeoutError
from corral.supervisor.gateway._tools import ToolInput
from corral.supervisor.store._sql import numbered


async def run_effect(
    conn: asyncpg.Connection,
    tool: SqlTool[Any],
    call: ToolCall,
    ctx: ToolInput[Any],
    record: CallRecord,
    decision: PolicyDecision,
    *,
    timeout_s: float,
    result_bytes: int,
) -> dict[str, Any]:
    """The effect's result; when it succeeded (no ``error``), its ledger entry and its audit
    record (``applied``) were written in the same statement.

    Raises:
        BodyFailed: as a body's failure: timed out, refused, raised what no retry mends, or
            returned more than ``result_bytes`` (the caller's transaction rolls back).
        asyncpg.UniqueViolationError: a duplicate of the call committed meanwhile.
    """
    _, ledger = record.ledger(call, "ok", {}, decision.reason, decision)
    del ledger["ledger_result"]  # the effect's
    names = [f"effect_{i}" for i in range(len(tool.effect_parameters))]
    effect_values = dict(zip(names, tool.values("effect", ctx), strict=True))
    effect_call = tool.call_sql("effect", [f"${name}" for name in names])
    entry = audit_entry(
        call,
        call.agent,
        ctx.customer,
        record.arguments.digest,
        decision.outcome,
        "applied",
        decision.reason,
        decision.policy_ids,
    )
    sql = numbered(effect_with_records(effect_call, APPEND_CALL))
    values = sql.values({**ledger, **effect_values, **append_values(entry)})
    try:
        row = await conn.fetchrow(sql.text, *values, timeout=timeout_s)
        result = json_object(row["result"] if row else None, tool.name, "result")
    except asyncpg.UniqueViolationError:
        raise  # ``decide`` answers from the ledger
    except Exception as exc:
        # asyncpg cancels the statement at the deadline: that is the tool's timeout.
        timed_out = isinstance(exc, TimeoutError)
        raise_body_failure(tool.name, ToolTimeoutError(tool.name, timeout_s) if timed_out else exc, timeout_s)
    check_result_size(tool.name, result, result_bytes)
    return result

"""The gateway's own SQL, in one place: what the call's first statement evaluates on the
conversation's row (locks, ledger, loop count, kill row, entering the tools' role or a
declared tool's facts), a declared effect with its records, and the ledger's INSERT that
rides along with an audit record. Parameters are named (``store._sql``).

Approval SQL lives with the approvals (``_approvals``), the journal's with the journal
(``store._journal``), the audit chain's with the chain (``audit._audit``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from corral.supervisor.store._agent_controls import KILLED_SQL
from corral.supervisor.store._roles import TOOLS_ROLE

_KILLED = KILLED_SQL.format("$call_agent")

_MAY_RUN = (
    "$call_may_run::boolean AND owner.status = 'running' AND owner.current_agent = $call_agent"
    f" AND owner.step = $call_step::integer AND {_KILLED} IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM tool_ledger l WHERE l.idempotency_key = $call_key)"
)
"""The call may run its tool's statements: nothing refused it before policy, and it is the
agent's running turn at the call's step, the agent is not killed, the key is undecided."""

LOCK_NAMESPACE = 0x746F6F6C  # "tool": one call per idempotency key at a time
CUSTOMER_NAMESPACE = 0x63757374  # "cust": one state-changing call per customer at a time

_CALL_EXPRESSIONS = (
    f"pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext($call_key)) AS key_lock,"
    f" CASE WHEN $call_changes_state::boolean"
    f" THEN pg_advisory_xact_lock({CUSTOMER_NAMESPACE}, hashtext(owner.customer)) END AS customer_lock,"
    " (SELECT jsonb_build_object('status', l.status, 'result', l.result, 'reason', l.reason,"
    "  'policy_ids', l.policy_ids, 'approval_id', l.approval_id)::text"
    "  FROM tool_ledger l WHERE l.idempotency_key = $call_key) AS ledger,"
    " (SELECT count(*) FROM tool_ledger l WHERE l.conversation = owner.id AND l.tool = $call_tool"
    "  AND l.resource_key = $call_resource_key) AS repeats,"
    f" {_KILLED} AS agent_killed,"
    f" CASE WHEN {_MAY_RUN} AND NOT $call_statements::boolean"
    f" THEN set_config('role', '{TOOLS_ROLE}', true) END AS tools_role"
)
"""Evaluated on the conversation's row (``owner``) in the statement that journals the call's
response, with the parameters of ``call_values``: the call's locks (its key; the customer's,
for a tool that changes state), what the ledger has for the key, how often the tool was
called on the same resource in the conversation, whether the agent is killed (locking its
row, share), and, when the call may run a tool body in Python, the tools' role entered for
the statements that follow (once the lock, the kill and the ledger are read: it is the
statement's last expression but the facts)."""


def call_expressions(facts_call: str | None) -> str:
    """The call's expressions; with ``facts_call`` (a ``SqlTool``'s facts function, from
    ``facts_placeholders``), the facts too when the call may run: evaluated last, after the
    locks (the function is VOLATILE: its query sees what committed while they were awaited)."""
    if facts_call is None:
        return _CALL_EXPRESSIONS
    return f"{_CALL_EXPRESSIONS}, CASE WHEN {_MAY_RUN} THEN {facts_call}::text END AS facts"


_ON_THE_ROW = {
    "customer": "owner.customer",
    "conversation": "owner.id",
    "agent": "$call_agent",
    "idempotency_key": "$call_key",
}


def facts_placeholders(names: Sequence[str], arguments: BaseModel) -> tuple[list[str], dict[str, object]]:
    """Where each of a facts statement's parameters comes from in the call's first statement
    (the call's context from the conversation's row and ``call_values``, an argument from
    ``$fact_<name>``), and the arguments' values."""
    placeholders: list[str] = []
    values: dict[str, object] = {}
    for name in names:
        if name in _ON_THE_ROW:
            placeholders.append(_ON_THE_ROW[name])
        else:
            placeholders.append(f"$fact_{name}")
            values[f"fact_{name}"] = getattr(arguments, name)
    return placeholders, values


def call_values(
    key: str,
    changes_state: bool,
    tool: str,
    resource_key: str,
    agent: str,
    may_run: bool,
    step: int,
    statements: bool,
) -> dict[str, object]:
    """The parameters of ``call_expressions``; ``statements``: the tool's are declared
    (``SqlTool``) and run inside the gateway's statements, not as a body."""
    return {
        "call_key": key,
        "call_changes_state": changes_state,
        "call_tool": tool,
        "call_resource_key": resource_key,
        "call_agent": agent,
        "call_may_run": may_run,
        "call_step": step,
        "call_statements": statements,
    }


def effect_with_records(effect_call: str, audit_call: str) -> str:
    """A ``SqlTool``'s effect (``effect_call``, its parameters ``$effect_*``), and if it
    succeeded (a result object without ``error``) its ledger entry (``$ledger_*`` but the
    result, which is the effect's) and audit record (``audit_call``), in one statement.
    Answers the result (text) and the audit record's id (NULL when nothing was recorded)."""
    return (
        f"WITH effect AS MATERIALIZED (SELECT {effect_call} AS result),"
        " kept AS MATERIALIZED (SELECT result,"
        "  coalesce(jsonb_typeof(result) = 'object' AND NOT result ? 'error', false) AS ok FROM effect),"
        " along AS (INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
        "  result, undo, reason, policy_ids, approval_id, resource_key)"
        "  SELECT $ledger_key, $ledger_conversation, $ledger_agent, $ledger_tool, $ledger_arguments::jsonb,"
        "  $ledger_status, kept.result, $ledger_undo, $ledger_reason, $ledger_policy_ids,"
        "  $ledger_approval_id, $ledger_resource_key FROM kept WHERE kept.ok RETURNING 1)"
        f" SELECT kept.result::text AS result, CASE WHEN kept.ok THEN {audit_call} END AS audit_id FROM kept"
    )


LEDGER_INSERT = (
    "INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
    " result, undo, reason, policy_ids, approval_id, resource_key)"
    " VALUES ($ledger_key, $ledger_conversation, $ledger_agent, $ledger_tool, $ledger_arguments::jsonb,"
    " $ledger_status, $ledger_result::jsonb, $ledger_undo, $ledger_reason, $ledger_policy_ids,"
    " $ledger_approval_id, $ledger_resource_key)"
)
"""One decision recorded for its key: the parameters of ``CallRecord.ledger``."""

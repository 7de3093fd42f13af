"""The gateway's own SQL, in one place: what the call's first statement evaluates on the
conversation's row (locks, ledger, loop count, kill row, entering the tools' role), and the
ledger's INSERT that rides along with an audit record.

Approval SQL lives with the approvals (``_approvals``), the journal's with the journal
(``store._journal``), the audit chain's with the chain (``audit._audit``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from corral.supervisor.store._agent_controls import KILLED_SQL
from corral.supervisor.store._roles import TOOLS_ROLE

_MAY_RUN = (
    "{5}::boolean AND owner.status = 'running' AND owner.current_agent = {4} AND owner.step = {6}::integer"
    f" AND {KILLED_SQL.format('{4}')} IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM tool_ledger l WHERE l.idempotency_key={0})"
)
"""The call may run its tool's statements: nothing refused it before policy ({5}), and it is
the agent's ({4}) running turn at step {6}, the agent is not killed, the key is undecided."""

LOCK_NAMESPACE = 0x746F6F6C  # "tool": one call per idempotency key at a time
CUSTOMER_NAMESPACE = 0x63757374  # "cust": one state-changing call per customer at a time

_CALL_EXPRESSIONS = (
    f"pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext({{0}})) AS key_lock,"
    f" CASE WHEN {{1}}::boolean THEN pg_advisory_xact_lock({CUSTOMER_NAMESPACE}, hashtext(owner.customer))"
    " END AS customer_lock,"
    " (SELECT jsonb_build_object('status', l.status, 'result', l.result, 'reason', l.reason,"
    "  'policy_ids', l.policy_ids, 'approval_id', l.approval_id)::text"
    "  FROM tool_ledger l WHERE l.idempotency_key={0}) AS ledger,"
    " (SELECT count(*) FROM tool_ledger l WHERE l.conversation=owner.id AND l.tool={2}"
    "  AND l.resource_key={3}) AS repeats,"
    f" {KILLED_SQL.format('{4}')} AS agent_killed,"
    f" CASE WHEN {_MAY_RUN} AND NOT {{7}}::boolean"
    f" THEN set_config('role', '{TOOLS_ROLE}', true) END AS tools_role"
)
"""Evaluated on the conversation's row (``owner``) in the statement that journals the call's
response, with its parameters in the order of ``call_parameters``: the call's locks ({0} its
key; {1} whether the tool changes state), what the ledger has for the key, how often the tool
({2}) was called on the same resource ({3}) in the conversation, whether the agent ({4}) is
killed (locking its row, share), and, when the call may run a tool body (``_MAY_RUN``) in
Python ({7} false), the tools' role entered for the statements that follow (once the lock,
the kill and the ledger are read: it is the statement's last expression but the facts)."""

FIRST_FACTS = 8
"""The first parameter of a declared facts statement, after ``call_parameters``'s."""


def call_expressions(facts_call: str | None) -> str:
    """The call's expressions; with ``facts_call`` (a ``SqlTool``'s facts function, its
    parameters from {8}), the facts too when the call may run: evaluated last, after the
    locks (the function is VOLATILE: its query sees what committed while they were awaited)."""
    if facts_call is None:
        return _CALL_EXPRESSIONS
    return f"{_CALL_EXPRESSIONS}, CASE WHEN {_MAY_RUN} THEN {facts_call}::text END AS facts"


_ON_THE_ROW = {
    "customer": "owner.customer",
    "conversation": "owner.id",
    "agent": "{4}",
    "idempotency_key": "{0}",
}


def facts_placeholders(names: Sequence[str], arguments: BaseModel) -> tuple[list[str], list[object]]:
    """Where each of a facts statement's parameters comes from in the call's first statement
    (the call's context from the conversation's row and ``call_parameters``, an argument
    from {8} on), and the arguments' values."""
    placeholders: list[str] = []
    values: list[object] = []
    for name in names:
        if name in _ON_THE_ROW:
            placeholders.append(_ON_THE_ROW[name])
        else:
            placeholders.append(f"{{{FIRST_FACTS + len(values)}}}")
            values.append(getattr(arguments, name))
    return placeholders, values


def call_parameters(
    key: str,
    changes_state: bool,
    tool: str,
    resource_key: str,
    agent: str,
    may_run: bool,
    step: int,
    statements: bool,
) -> tuple[object, ...]:
    """The parameters of ``call_expressions``, {0} to {7}; ``statements``: the tool's are
    declared (``SqlTool``) and run inside the gateway's statements, not as a body."""
    return (key, changes_state, tool, resource_key, agent, may_run, step, statements)


def effect_with_records(effect_call: str, audit_call: str) -> str:
    """A ``SqlTool``'s effect, and if it succeeded (a result object without ``error``) its
    ledger entry and audit record, in one statement. Parameters: the ledger's without its
    result ($1..$11, the order of ``CallRecord.ledger`` less ``result``), then the effect's
    (in ``effect_call``), then the audit record's (in ``audit_call``). Answers the result
    (text) and the audit record's id (NULL when nothing was recorded)."""
    return (
        f"WITH effect AS MATERIALIZED (SELECT {effect_call} AS result),"
        " kept AS MATERIALIZED (SELECT result,"
        "  coalesce(jsonb_typeof(result) = 'object' AND NOT result ? 'error', false) AS ok FROM effect),"
        " along AS (INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
        "  result, undo, reason, policy_ids, approval_id, resource_key)"
        "  SELECT $1, $2, $3, $4, $5::jsonb, $6, kept.result, $7, $8, $9, $10, $11 FROM kept WHERE kept.ok"
        "  RETURNING 1)"
        f" SELECT kept.result::text AS result, CASE WHEN kept.ok THEN {audit_call} END AS audit_id FROM kept"
    )


EFFECT_LEDGER_PARAMETERS = 11
"""How many ledger parameters ``effect_with_records`` takes before the effect's."""


LEDGER_INSERT = (
    "INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
    " result, undo, reason, policy_ids, approval_id, resource_key)"
    " VALUES ($1,$2,$3,$4,$5::jsonb,$6,$7::jsonb,$8,$9,$10,$11,$12)"
)
"""One decision recorded for its key: parameters in the order of ``CallRecord.ledger``."""

"""The gateway's own SQL, in one place: what the call's first statement evaluates on the
conversation's row (locks, ledger, loop count, kill row, entering the tools' role), and the
ledger's INSERT that rides along with an audit record.

Approval SQL lives with the approvals (``_approvals``), the journal's with the journal
(``store._journal``), the audit chain's with the chain (``audit._audit``).
"""

from __future__ import annotations

from corral.supervisor.store._agent_controls import KILLED_SQL
from corral.supervisor.store._roles import TOOLS_ROLE

LOCK_NAMESPACE = 0x746F6F6C  # "tool": one call per idempotency key at a time
CUSTOMER_NAMESPACE = 0x63757374  # "cust": one state-changing call per customer at a time

CALL_EXPRESSIONS = (
    f"pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext({{0}})) AS key_lock,"
    f" CASE WHEN {{1}}::boolean THEN pg_advisory_xact_lock({CUSTOMER_NAMESPACE}, hashtext(owner.customer))"
    " END AS customer_lock,"
    " (SELECT jsonb_build_object('status', l.status, 'result', l.result, 'reason', l.reason,"
    "  'policy_ids', l.policy_ids, 'approval_id', l.approval_id)::text"
    "  FROM tool_ledger l WHERE l.idempotency_key={0}) AS ledger,"
    " (SELECT count(*) FROM tool_ledger l WHERE l.conversation=owner.id AND l.tool={2}"
    "  AND l.resource_key={3}) AS repeats,"
    f" {KILLED_SQL.format('{4}')} AS agent_killed,"
    " CASE WHEN {5}::boolean AND owner.status = 'running' AND owner.current_agent = {4}"
    "  AND owner.step = {6}::integer"
    f"  AND {KILLED_SQL.format('{4}')} IS NULL"
    "  AND NOT EXISTS (SELECT 1 FROM tool_ledger l WHERE l.idempotency_key={0})"
    f" THEN set_config('role', '{TOOLS_ROLE}', true) END AS tools_role"
)
"""Evaluated on the conversation's row (``owner``) in the statement that journals the call's
response, with its parameters in the order of ``call_parameters``: the call's locks ({0} its
key; {1} whether the tool changes state), what the ledger has for the key, how often the tool
({2}) was called on the same resource ({3}) in the conversation, whether the agent ({4}) is
killed (locking its row, share), and, when the call may run a tool body ({5}: nothing refuses
it before policy, no budget reads the database) at step {6}, the tools' role entered for the
statements that follow (once the lock, the kill and the ledger are read: it is the
statement's last expression)."""


def call_parameters(
    key: str, changes_state: bool, tool: str, resource_key: str, agent: str, may_run: bool, step: int
) -> tuple[object, ...]:
    """The parameters of ``CALL_EXPRESSIONS``, {0} to {6}."""
    return (key, changes_state, tool, resource_key, agent, may_run, step)


LEDGER_INSERT = (
    "INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
    " result, undo, reason, policy_ids, approval_id, resource_key)"
    " VALUES ($1,$2,$3,$4,$5::jsonb,$6,$7::jsonb,$8,$9,$10,$11,$12)"
)
"""One decision recorded for its key: parameters in the order of ``CallRecord.ledger``."""

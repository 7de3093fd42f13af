"""An operator's verdict on a pending approval, taken by the supervisor (for the API, which
holds no database credentials; `corral approve` writes the decision itself): the decider
checked against ``tools.approvers``, the decision recorded, the waiting conversation
resumed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from corral.bus import ApprovalVerdict, OperatorAnswer
from corral.supervisor.core import _decide
from corral.supervisor.core._graph import Act
from corral.supervisor.gateway._approvals import ApprovalError, decide_approval, decider_problem


async def take_verdict(
    pool: asyncpg.Pool, act: Act, verdict: ApprovalVerdict, approvers: Mapping[str, Sequence[str]]
) -> OperatorAnswer:
    """Grant or deny ``verdict.approval_id`` as ``verdict.by`` (an operator, or the
    conversation's customer), then resume its conversation."""
    row = await pool.fetchrow("SELECT approver, customer FROM approvals WHERE id=$1", verdict.approval_id)
    if row is None:
        return OperatorAnswer(status="refused", reason=f"no approval {verdict.approval_id!r}")
    why = decider_problem(
        row["approver"], verdict.by, approvers, customer=verdict.customer, owner=row["customer"] or ""
    )
    if why is not None:
        return OperatorAnswer(
            status="refused", reason=f"approval {verdict.approval_id} cannot be decided: {why}"
        )
    try:
        record = await decide_approval(
            pool, verdict.approval_id, approve=verdict.approve, by=verdict.by, reason=verdict.reason
        )
    except ApprovalError as exc:
        return OperatorAnswer(status="refused", reason=str(exc))
    status = "approved" if verdict.approve else "denied"
    await act(record.conversation, lambda r: _decide.approval_decided(r, verdict.approval_id, status))
    return OperatorAnswer(status="ok")

"""What the gateway writes and answers about one tool call: the ledger entry for its key,
its audit record, and the ``ToolResult`` the agent gets (or the ledger's, replayed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from corral.bus import ToolCall, ToolResult, ToolStatus
from corral.supervisor.audit._audit import AuditEntry
from corral.supervisor.gateway._policy import PolicyDecision
from corral.supervisor.gateway._statements import LEDGER_INSERT
from corral.supervisor.gateway._tools import Tool


@dataclass(frozen=True)
class CheckedArguments:
    """A call's validated arguments as JSON, their digest (what the audit records) and the
    resource they name (what the loop breaker counts by, with the tool)."""

    json: dict[str, Any]
    digest: str
    resource_key: str


@dataclass(frozen=True)
class CallRecord:
    """What the ledger records for a call's key, whatever the decision."""

    key: str
    tool: Tool[Any]
    arguments: CheckedArguments

    def ledger(
        self,
        call: ToolCall,
        status: ToolStatus,
        result: dict[str, Any],
        reason: str,
        decision: PolicyDecision | None = None,
        approval_id: str | None = None,
    ) -> tuple[str, dict[str, object]]:
        """The ledger's INSERT of this decision (written along with its audit record)."""
        return LEDGER_INSERT, {
            "ledger_key": self.key,
            "ledger_conversation": call.conversation,
            "ledger_agent": call.agent,
            "ledger_tool": self.tool.name,
            "ledger_arguments": json.dumps(self.arguments.json),
            "ledger_status": status,
            "ledger_result": json.dumps(result),
            "ledger_undo": self.tool.undo,
            "ledger_reason": reason,
            "ledger_policy_ids": list(decision.policy_ids) if decision else [],
            "ledger_approval_id": approval_id,
            "ledger_resource_key": self.arguments.resource_key,
        }


def audit_entry(
    call: ToolCall,
    agent: str,
    customer: str,
    arguments_digest: str,
    decision: str,
    outcome: str,
    detail: str,
    policy_ids: Iterable[str] = (),
    approval_id: str | None = None,
) -> AuditEntry:
    """The audit record of one decision about ``call``, made for ``agent``'s identity."""
    return AuditEntry(
        agent=agent,
        credential_id=f"agent-{agent}",
        on_behalf_of=customer,
        conversation=call.conversation,
        action=call.tool,
        arguments_digest=arguments_digest,
        decision=decision,
        policy_ids=tuple(policy_ids),
        approval_id=approval_id,
        outcome=outcome,
        detail=detail,
    )


def answer(
    call: ToolCall,
    status: ToolStatus,
    result: dict[str, Any],
    *,
    decision: PolicyDecision | None = None,
    reason: str | None = None,
    approval_id: str | None = None,
) -> ToolResult:
    """The answer to ``call``: the reason is the decision's unless one is given."""
    return ToolResult(
        conversation=call.conversation,
        step=call.step,
        index=call.index,
        tool=call.tool,
        status=status,
        result=result,
        reason=reason if reason is not None else (decision.reason if decision else ""),
        policy_ids=list(decision.policy_ids) if decision else [],
        approval_id=approval_id,
    )


def replay(call: ToolCall, recorded: dict[str, Any]) -> ToolResult:
    """The answer the ledger holds for ``call``'s key."""
    return ToolResult(
        conversation=call.conversation,
        step=call.step,
        index=call.index,
        tool=call.tool,
        status=recorded["status"],
        result=recorded["result"],
        reason=recorded["reason"],
        policy_ids=list(recorded["policy_ids"]),
        approval_id=recorded["approval_id"],
        replayed=True,
    )

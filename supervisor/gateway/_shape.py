"""A tool call's shape, checked before the database is asked: the body's agent is the
sender, the tool exists, the
arguments are valid and not too big, and config grants the tool within the per-step cap;
and, once the call's first statement has read the conversation, whether it is the agent's
turn; then what the tool is handed and what Cedar is asked (or why it is not: a call for no
customer, or naming what the backend does not know)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from pydantic import BaseModel, ValidationError

from corral.bus import ToolCall, ToolStatus
from corral.supervisor.audit._audit import digest_arguments
from corral.supervisor.gateway._config import GatewayConfig
from corral.supervisor.gateway._policy import PolicyDecision, PolicyEngine, PolicyRequest
from corral.supervisor.gateway._records import CheckedArguments
from corral.supervisor.gateway._tools import Resource, Tool, ToolInput

_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Shaped:
    """A call whose shape was checked: what its transaction needs."""

    call: ToolCall
    sender: str
    tool: Tool[Any]
    key: str
    arguments: BaseModel | None
    checked: CheckedArguments
    refusal: tuple[ToolStatus, str] | None
    """Config and the call's shape refuse it before policy: (status, reason)."""


def shape(
    call: ToolCall, sender: str, tools: Mapping[str, Tool[Any]], config: GatewayConfig
) -> Shaped | tuple[ToolStatus, str]:
    """The call checked without the database, or a refusal that needs no conversation."""
    if call.agent != sender:
        return "denied", f"call on {sender}'s subject claims to come from {call.agent!r}"
    tool = tools.get(call.tool)
    if tool is None:
        return "denied", f"no tool named {call.tool!r}"
    arguments, invalid = _validate(tool, call.arguments, config.limits.tool_arguments_bytes)
    dumped = arguments.model_dump(mode="json") if arguments else {}
    checked = CheckedArguments(
        dumped,
        digest_arguments(dumped) if arguments else "",
        tool.resource_key(dumped) if arguments else "",
    )
    key = f"{call.conversation}:{call.step}:{call.index}"
    refusal = _before_policy(call, sender, invalid, config)
    return Shaped(call, sender, tool, key, arguments, checked, refusal)


def _validate(tool: Tool[Any], raw: dict[str, Any], limit: int) -> tuple[BaseModel | None, str]:
    """(the arguments, "") or (None, why they are invalid)."""
    encoded = _json.encode(raw)
    if (size := len(encoded)) > limit:
        return None, f"invalid arguments: {size} bytes, over limits.tool_arguments_bytes ({limit})"
    if b"\\u0000" in encoded:  # PostgreSQL stores no NUL: the call could never be recorded
        return None, "invalid arguments: they contain a NUL character"
    try:
        return tool.arguments.model_validate(raw), ""
    except ValidationError as exc:
        return None, f"invalid arguments: {exc.errors(include_url=False)}"


def _before_policy(
    call: ToolCall, sender: str, invalid: str, config: GatewayConfig
) -> tuple[ToolStatus, str] | None:
    """A refusal config and the call's shape decide alone: (status, reason), or None."""
    grants = config.grants
    if grants is not None and call.tool not in grants.get(sender, ()):
        return "denied", f"tool {call.tool} is not granted to agent {sender} (agents.{sender}.tools)"
    cap = config.max_calls_per_step.get(sender, config.default_max_calls_per_step)
    if not 0 <= call.index < cap:
        return "stopped", f"call {call.index} of step {call.step}: at most {cap} tool calls per step"
    if invalid:
        return "invalid", invalid
    return None


def not_callable(
    conversation: asyncpg.Record | None, sender: str, step: int
) -> tuple[ToolStatus, str] | None:
    """Why the conversation's state refuses ``sender``'s call at ``step`` (None: it does not):
    the agent is killed, the conversation is not running, or it is not the agent's turn. The
    call's first statement enters the tools' role on the same conditions."""
    if conversation is None:
        return "denied", "the conversation is not running"
    if conversation["agent_killed"] is not None:
        return "stopped", f"agent {sender} is killed ({conversation['agent_killed']})"
    if conversation["status"] != "running":
        return "denied", "the conversation is not running"
    if conversation["current_agent"] != sender or conversation["step"] != step:
        return "denied", f"step {step} is not {sender}'s turn"
    return None


def missing_customer(tool: Tool[Any], customer: str) -> PolicyDecision | None:
    """The refusal of a call that acts for a customer in a conversation without one (None: it
    does not): no policy is asked what the call could not do for anyone."""
    if tool.needs_customer and not customer:
        return PolicyDecision("deny", (), None, "the conversation has no customer")
    return None


def authorize(
    policy: PolicyEngine, call: ToolCall, tool: Tool[Any], resource: Resource, customer: str
) -> PolicyDecision:
    """Cedar's decision on the call: the agent, the tool, what it touches (with its attributes
    and parents), the facts and the acting customer; or the refusal of a call naming what the
    backend does not know (``Resource.unknown``), which no policy is asked about."""
    if resource.unknown:
        return PolicyDecision("deny", (), None, f"{resource.unknown} is not known")
    request = PolicyRequest(
        principal=call.agent,
        action=tool.name,
        resource_type=resource.type,
        resource_id=resource.id,
        context=resource.facts,
        customer=customer,
        attributes=resource.attributes,
        parents=resource.parents,
    )
    return policy.decide(request)


def tool_input(shaped: Shaped, conn: asyncpg.Connection, customer: str) -> ToolInput[Any]:
    """What the tool is handed for a call whose arguments are valid, on the call's connection."""
    assert shaped.arguments is not None
    call = shaped.call
    return ToolInput(
        arguments=shaped.arguments,
        customer=customer,
        conversation=call.conversation,
        agent=shaped.sender,
        idempotency_key=shaped.key,
        conn=conn,
    )

"""What an agent's step says to its model: the prompts, and how a tool's outcome reads."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from corral.agents._turns import ToolUse
from corral.bus import AgentTask, ChatToolCall, ChatTurn, Hop, Limits, ToolResult, Turn, clip


def encode_arguments(arguments: dict[str, Any]) -> str:
    """A tool call's arguments as they are sent (for their size)."""
    return msgspec.json.encode(arguments).decode()


def tool_message(result: ToolResult) -> str:
    """How a tool's outcome is shown to the model (rules of the scripted model match it)."""
    text = f"tool {result.tool} -> {result.status}: {json.dumps(result.result, sort_keys=True)}"
    if result.reason:
        text += f"\nreason: {result.reason}"
    if result.policy_ids:
        text += f"\npolicies: {', '.join(result.policy_ids)}"
    if result.approval_id:
        text += f"\napproval: {result.approval_id}"
    return text


def tool_turn(agent: str, use: ToolUse, shown: str, limits: Limits) -> Turn:
    """A tool call and its outcome as the transcript keeps them (within the output's limits)."""
    return Turn(
        role="tool",
        agent=agent,
        tool=use.tool,
        call_id=use.call_id,
        arguments=encode_arguments(use.arguments),
        text=clip(shown, limits.reason_bytes),
    )


def transcript_turns(task: AgentTask) -> list[ChatTurn]:
    """The conversation's earlier turns as model history: the customer's messages as the
    user's, the replies as the assistant's (naming whoever gave them, if not this agent),
    and each tool call as the native tool-calling history has it: the assistant's call,
    then its result (an other agent's named in the result)."""
    history: list[ChatTurn] = []
    for turn in task.transcript:
        if turn.role == "tool":
            call = ChatToolCall(id=turn.call_id, name=turn.tool, arguments=turn.arguments or "{}")
            shown = turn.text if turn.agent == task.agent else f"({turn.agent}) {turn.text}"
            history.append(ChatTurn(role="assistant", tool_calls=[call]))
            history.append(ChatTurn(role="tool", tool_call_id=turn.call_id, content=shown))
        elif turn.role == "customer":
            history.append(ChatTurn(role="user", content=turn.text))
        elif turn.role == "agent" and turn.agent == task.agent:
            history.append(ChatTurn(role="assistant", content=turn.text))
        else:
            who = turn.agent if turn.role == "agent" else f"operator {turn.agent}"
            history.append(ChatTurn(role="assistant", content=f"({who}) {turn.text}"))
    return history


def user_prompt(task: AgentTask) -> str:
    lines = [f"Customer {task.customer or '(anonymous)'} says:", task.text]
    handoffs = [hop for hop in task.path[1:] if hop.reason or hop.payload]
    if handoffs:
        lines.append("")
        lines.append("Notes from the agents before you:")
        lines.extend(f"- to {hop.agent}: {_note(hop)}" for hop in handoffs)
    return "\n".join(lines)


def _note(hop: Hop) -> str:
    extra = {k: v for k, v in hop.payload.items() if k != "reason"}
    if not extra:
        return hop.reason
    details = json.dumps(extra, sort_keys=True)
    return f"{hop.reason} {details}" if hop.reason else details

"""What an agent's step says to its model, and keeps of what the model answers: the
prompts, how a tool's outcome reads, and a response bounded to what may be journaled."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from corral.bus import AgentTask, JournalEntry, Limits, ToolResult, clip


def encode_arguments(arguments: dict[str, Any]) -> str:
    """A tool call's arguments as they are sent (for their size)."""
    return msgspec.json.encode(arguments).decode()


_CUT = "\n[cut by corral: the response was {size} bytes, over limits.response_text_bytes]"


def bounded(response: JournalEntry | None, limits: Limits) -> JournalEntry | None:
    """A model response as it may be journaled: its text cut to ``limits.response_text_bytes``
    (what it cost is kept whole), so that it fits beside what it caused."""
    if response is None:
        return None
    limit = limits.response_text_bytes
    text = response.text.replace("\x00", "\ufffd")
    size = len(text.encode())
    if size > limit:
        note = _CUT.format(size=size)
        text = clip(text, max(limit - len(note.encode()), 0)) + note
    return response if text == response.text else msgspec.structs.replace(response, text=text)


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


def user_prompt(task: AgentTask) -> str:
    lines = [f"Customer {task.customer or '(anonymous)'} says:", task.text]
    handoffs = [hop for hop in task.path[1:] if hop.reason]
    if handoffs:
        lines.append("")
        lines.append("Notes from the agents before you:")
        lines.extend(f"- to {hop.agent}: {hop.reason}" for hop in handoffs)
    return "\n".join(lines)

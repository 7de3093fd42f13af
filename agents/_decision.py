"""What a model may decide at the end of a step, parsed once from its text answer."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from corral.agents.errors import DecisionError
from corral.bus import DECODE_ERRORS


class HandoffDecision(msgspec.Struct, frozen=True, kw_only=True, tag="handoff", tag_field="action"):
    """Hand the conversation to another agent."""

    target: str
    confidence: float
    reason: str = ""


class ReplyDecision(msgspec.Struct, frozen=True, kw_only=True, tag="reply", tag_field="action"):
    """Answer the customer and end the conversation."""

    text: str
    confidence: float = 1.0


class ToolDecision(msgspec.Struct, frozen=True, kw_only=True, tag="tool", tag_field="action"):
    """Call a tool through the gateway, then decide again with its result."""

    tool: str
    arguments: dict[str, Any] = {}


Decision = HandoffDecision | ReplyDecision | ToolDecision

_decoder = msgspec.json.Decoder(Decision)

RESPONSE_FORMAT = (
    "Answer with one JSON object and nothing else, either\n"
    '  {"action": "handoff", "target": "<agent>", "confidence": <0..1>, "reason": "<why>"}\n'
    "to hand the conversation to one of: {targets}; or\n"
    '  {"action": "reply", "text": "<your answer to the customer>", "confidence": <0..1>}\n'
    "to answer the customer yourself."
)


def parse_decision(text: str, *, agent: str) -> Decision:
    """Parse a model's answer into a decision.

    Models often wrap JSON in prose or code fences, so the outermost ``{…}`` is taken.

    Raises:
        DecisionError: if no valid decision is in the text.
    """
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise DecisionError(f"model answer is not JSON: {text[:200]!r}", agent=agent)
    try:
        decision: Decision = _decoder.decode(text[start : end + 1])
    except DECODE_ERRORS as exc:
        raise DecisionError(f"model answer is not a decision ({exc}): {text[:200]!r}", agent=agent) from exc
    if isinstance(decision, ToolDecision):
        return decision
    if not 0.0 <= decision.confidence <= 1.0:
        raise DecisionError(f"confidence {decision.confidence} is outside 0..1", agent=agent)
    return decision


def response_format(targets: list[str], tools: list[dict[str, Any]] | None = None) -> str:
    """The instruction telling a model how to answer, listing the targets and tools."""
    text = RESPONSE_FORMAT.replace("{targets}", json.dumps(targets) if targets else "(none)")
    if tools:
        text += (
            "\nor, to use a tool first (you will see its result and answer again):\n"
            '  {"action": "tool", "tool": "<name>", "arguments": {...}}\n'
            "Tools (name, what it does, JSON Schema of its arguments):\n"
            + "\n".join(f"- {t['name']}: {t['description']} {json.dumps(t['schema'])}" for t in tools)
        )
    return text

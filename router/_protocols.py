"""How tools are offered to a model, and how its answer is read back as tool calls.

Three protocols, one shape for callers:

- ``native``: OpenAI function calling, ``tools=`` with ``tool_choice="required"``; the
  history keeps its assistant ``tool_calls`` and ``tool`` turns.
- ``json_schema``: structured output; ``response_format`` is the JSON Schema of one
  object ``{"calls": [{"name": …, "arguments": {…}}]}`` (one ``anyOf`` branch per tool,
  so each name comes with its own arguments' schema) and no ``tools=`` is sent.
- ``text``: the system prompt is told to answer with that same object, and lists the
  tools; the answer's outermost ``{…}`` is read (models wrap JSON in prose and fences).

For the two non-native protocols the history is written without tool roles (a model
without function calling may refuse them): an assistant turn's calls become the JSON it
would have written, and a tool result becomes a user message naming its call. The answer
comes back as tool calls with ids ``call_<n>``, as if the model had called natively; an
answer that does not parse is plain content with no calls (the caller tells the model).

Pure functions, no litellm: ``offer()`` builds the request, ``read()`` the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.bus import ChatToolCall, ChatTurn, ToolSpec

WireProtocol = Literal["native", "json_schema", "text"]
"""A resolved tool protocol (``auto`` already decided)."""

_SCHEMA_NAME = "tool_calls"


@dataclass(frozen=True, kw_only=True)
class Offer:
    """What to send: the messages (OpenAI's chat shape) and the extra request parameters."""

    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)


def offer(protocol: WireProtocol, messages: list[ChatTurn], tools: list[ToolSpec]) -> Offer:
    """The request for ``messages`` offering ``tools`` by ``protocol``.

    Args:
        protocol: How the model is offered tools.
        messages: The history, system prompt first.
        tools: The functions the model may call (none: a plain chat request).

    Returns:
        The messages in OpenAI's chat shape and the parameters to add to the call.
    """
    if protocol == "native" or not tools:
        params: dict[str, Any] = {}
        if tools:
            params = {"tools": [_function(t) for t in tools], "tool_choice": "required"}
        return Offer(messages=[native_message(m) for m in messages], params=params)
    wire = [_plain_message(m) for m in messages]
    if protocol == "text":
        _append_system(wire, text_instructions(tools))
        return Offer(messages=wire)
    _append_system(wire, _JSON_INSTRUCTION)
    return Offer(
        messages=wire,
        params={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": _SCHEMA_NAME, "schema": calls_schema(tools)},
            }
        },
    )


def read(content: str) -> tuple[str, list[ChatToolCall]]:
    """A non-native answer as ``(content, tool_calls)``.

    The outermost ``{…}`` of ``content`` is parsed as ``{"calls": [{"name", "arguments"}]}``
    (a bare ``{"name", "arguments"}`` is one call). Anything else is plain content.
    """
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end <= start:
        return content, []
    try:
        decoded = json.loads(content[start : end + 1])
    except ValueError:
        return content, []
    if isinstance(decoded, dict) and "calls" not in decoded and "name" in decoded:
        decoded = {"calls": [decoded]}
    raw_calls = decoded.get("calls") if isinstance(decoded, dict) else None
    if not isinstance(raw_calls, list) or not raw_calls:
        return content, []
    calls: list[ChatToolCall] = []
    for number, raw in enumerate(raw_calls):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return content, []
        arguments = raw.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ChatToolCall(id=f"call_{number}", name=raw["name"], arguments=text))
    return "", calls


def native_message(turn: ChatTurn) -> dict[str, Any]:
    """One turn in OpenAI's chat shape, tool calls and tool results included."""
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls
        ]
    if turn.role == "tool":
        message["tool_call_id"] = turn.tool_call_id
    return message


def calls_schema(tools: list[ToolSpec]) -> dict[str, Any]:
    """The JSON Schema of one answer: ``{"calls": [one of the tools' calls, …]}``."""
    branches = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.name]},
                "arguments": t.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {
        "type": "object",
        "properties": {"calls": {"type": "array", "minItems": 1, "items": {"anyOf": branches}}},
        "required": ["calls"],
        "additionalProperties": False,
    }


def text_instructions(tools: list[ToolSpec]) -> str:
    """What the ``text`` protocol adds to the system prompt: the answer's shape and the tools."""
    listed = "\n".join(
        f"- {t.name}: {t.description or '(no description)'}\n  arguments (JSON Schema): "
        f"{json.dumps(t.parameters or {'type': 'object'})}"
        for t in tools
    )
    return (
        "Answer with exactly one JSON object and nothing else: "
        '{"calls": [{"name": "<tool name>", "arguments": {...}}]}, '
        "calling one or more of these tools in order:\n" + listed
    )


_JSON_INSTRUCTION = (
    'Answer with one JSON object {"calls": [{"name": ..., "arguments": {...}}]} '
    "calling one or more of the tools the response format allows."
)


def _function(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters or {"type": "object", "properties": {}},
        },
    }


def _plain_message(turn: ChatTurn) -> dict[str, Any]:
    """A turn without tool roles: calls as the JSON the model would write, results as user text."""
    if turn.role == "tool":
        return {"role": "user", "content": f"Result of tool call {turn.tool_call_id}:\n{turn.content}"}
    if turn.tool_calls:
        calls = [{"name": c.name, "arguments": _loads_or_text(c.arguments)} for c in turn.tool_calls]
        written = json.dumps({"calls": calls})
        return {"role": "assistant", "content": f"{turn.content}\n{written}" if turn.content else written}
    return {"role": turn.role, "content": turn.content}


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _append_system(messages: list[dict[str, Any]], text: str) -> None:
    """Add ``text`` to the system prompt (the first message), or open one."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        messages[0] = {**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text}
    else:
        messages.insert(0, {"role": "system", "content": text})

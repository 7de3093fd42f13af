"""What an agent offers its model as tools, and what it makes of the model's turn.

A step ends with a call of ``reply`` (an answer to the customer, with a confidence) or of
``transfer_to_<agent>`` (a handoff along an edge of the graph, with the edge's payload and
a confidence). Every other call is a team tool, which runs through the tool gateway. A
turn may hold several calls: the team tools run in order, then the step ends if one of the
calls ended it. A turn that cannot be acted on (plain text, an unknown tool, arguments that
are not a JSON object, a missing confidence, two ends) is told back to the model, call by
call, and asked again, a bounded number of times. (A tool that was not offered still goes
to the tool gateway, which denies it on the record; its answer is the call's result.)
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any, TypedDict

import msgspec

from corral.agents._settings import AgentSettings
from corral.bus import DECODE_ERRORS, ChatToolCall, ChatTurn, ModelAnswer, ToolResult, ToolSpec
from corral.router import REPLY_TOOL, transfer_tool
from corral.router._names import TRANSFER_PREFIX

_CONFIDENCE = {
    "type": "number",
    "minimum": 0,
    "maximum": 1,
    "description": "How sure you are that this is right, from 0 to 1.",
}


def reply_spec() -> ToolSpec:
    """The tool that ends a step with an answer to the customer."""
    return ToolSpec(
        name=REPLY_TOOL,
        description="Answer the customer yourself; this ends your turn.",
        parameters={
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "Your answer to the customer."},
                "confidence": _CONFIDENCE,
                "awaiting_customer": {
                    "type": "boolean",
                    "description": "true if you asked the customer something and need their answer"
                    " to go on; leave it out when your answer resolves their request.",
                },
            },
            "required": ["text", "confidence"],
            "additionalProperties": False,
        },
    )


def transfer_spec(target: str, payload_schema: dict[str, Any] | None = None) -> ToolSpec:
    """The tool that hands the conversation to ``target``: its arguments are the edge's
    payload (or a ``reason``) and a confidence."""
    if payload_schema is None:
        properties: dict[str, Any] = {
            "reason": {"type": "string", "description": f"What {target} needs to know."}
        }
        required = ["reason"]
        defs: dict[str, Any] = {}
    else:
        properties = dict(payload_schema.get("properties", {}))
        required = list(payload_schema.get("required", []))
        defs = payload_schema.get("$defs", {})
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {**properties, "confidence": _CONFIDENCE},
        "required": [*required, "confidence"],
    }
    if defs:
        parameters["$defs"] = defs
    if payload_schema is not None and "additionalProperties" in payload_schema:
        parameters["additionalProperties"] = payload_schema["additionalProperties"]
    return ToolSpec(
        name=transfer_tool(target),
        description=f"Hand the conversation to the {target} agent; this ends your turn.",
        parameters=parameters,
    )


def offered_tools(settings: AgentSettings) -> list[ToolSpec]:
    """What an agent's model is offered: its team tools, one ``transfer_to_<agent>`` per
    edge, and ``reply``. The model gateway offers exactly these (it builds them from the
    same config): the agent names none of them."""
    return [
        *(
            ToolSpec(name=t["name"], description=t.get("description", ""), parameters=t["schema"])
            for t in settings.tools
        ),
        *(transfer_spec(edge.target, edge.payload_schema) for edge in settings.edges),
        reply_spec(),
    ]


@dataclass(frozen=True, kw_only=True)
class ToolUse:
    """A team tool the model called."""

    call_id: str
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Transfer:
    """The model hands the conversation to ``target``."""

    call_id: str
    target: str
    confidence: float
    reason: str
    payload: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Reply:
    """The model answers the customer."""

    call_id: str
    text: str
    confidence: float
    awaiting_customer: bool = False
    """The model asked the customer something: the conversation waits for their answer."""


@dataclass(frozen=True, kw_only=True)
class Turn:
    """A model turn as the agent acts on it: team tools in order, then maybe an end; or,
    when ``problems`` is not empty, what to tell the model instead (by call id, "" for the
    turn as a whole)."""

    tools: list[ToolUse] = field(default_factory=list)
    end: Transfer | Reply | None = None
    problems: dict[str, str] = field(default_factory=dict)


_object = msgspec.json.Decoder(dict[str, Any])


def read_turn(answer: ModelAnswer, targets: Set[str], team: Set[str] = frozenset()) -> Turn:
    """Read the model's turn: ``targets`` are the agents it may transfer to, ``team`` every
    agent. A transfer to an agent of the team that is not a target is read as one (the
    supervisor refuses it, and the client is told: the graph is a fence, not a hint); to a
    name that is no agent, it is told back."""
    if not answer.tool_calls:
        names = ", ".join(sorted([REPLY_TOOL, *(transfer_tool(t) for t in targets)]))
        return Turn(problems={"": f"Call a tool: to end your turn, call one of {names}."})
    uses: list[ToolUse] = []
    ends: list[Transfer | Reply] = []
    problems: dict[str, str] = {}
    for call in answer.tool_calls:
        try:
            arguments = _object.decode(call.arguments or "{}")
        except DECODE_ERRORS as exc:
            problems[call.id] = f"error: the arguments of {call.name} are not a JSON object ({exc})"
            continue
        if call.name != REPLY_TOOL and not call.name.startswith(TRANSFER_PREFIX):
            # Any other name goes to the tool gateway, offered or not: it denies what the
            # agent is not granted (or what does not exist) on the record, and the model
            # sees why as the call's result.
            uses.append(ToolUse(call_id=call.id, tool=call.name, arguments=arguments))
            continue
        end, problem = _end(call, arguments, targets | team)
        if problem is not None:
            problems[call.id] = problem
        elif end is not None:
            ends.append(end)
    if len(ends) > 1:
        for end in ends:
            problems[end.call_id] = "error: end your turn once: one reply or one transfer"
    if problems:
        return Turn(problems=problems)
    return Turn(tools=uses, end=ends[0] if ends else None)


def _end(
    call: ChatToolCall, arguments: dict[str, Any], targets: Set[str]
) -> tuple[Transfer | Reply | None, str | None]:
    confidence = arguments.get("confidence")
    if not isinstance(confidence, int | float) or isinstance(confidence, bool) or not 0 <= confidence <= 1:
        confidence_problem = f"error: {call.name} needs a confidence, a number from 0 to 1"
    else:
        confidence_problem = None
    if call.name == REPLY_TOOL:
        text = arguments.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, "error: reply needs the text of your answer"
        if confidence_problem is not None:
            return None, confidence_problem
        awaiting = arguments.get("awaiting_customer", False)
        if not isinstance(awaiting, bool):
            return None, "error: awaiting_customer of reply is true or false"
        return (
            Reply(call_id=call.id, text=text, confidence=float(confidence), awaiting_customer=awaiting),  # type: ignore[arg-type]
            None,
        )
    if call.name.startswith(TRANSFER_PREFIX):
        target = call.name.removeprefix(TRANSFER_PREFIX)
        if target not in targets:
            allowed = ", ".join(sorted(targets)) or "none"
            return None, f"error: you cannot transfer to {target!r} (you may transfer to: {allowed})"
        if confidence_problem is not None:
            return None, confidence_problem
        payload = {k: v for k, v in arguments.items() if k != "confidence"}
        reason = payload.get("reason")
        return (
            Transfer(
                call_id=call.id,
                target=target,
                confidence=float(confidence),  # type: ignore[arg-type]
                reason=reason if isinstance(reason, str) else "",
                payload=payload,
            ),
            None,
        )
    return None, f"error: there is no tool {call.name!r}"


def assistant_turn(answer: ModelAnswer) -> ChatTurn:
    """The model's turn, as it goes back into its history."""
    return ChatTurn(role="assistant", content=answer.content, tool_calls=answer.tool_calls)


def corrections(answer: ModelAnswer, problems: dict[str, str]) -> list[ChatTurn]:
    """What the model is told of a turn it must redo: every call answered (the templates
    of every provider expect that), with its problem or as not run."""
    told = [
        ChatTurn(
            role="tool",
            tool_call_id=call.id,
            content=problems.get(call.id, "not run: another call of this turn was wrong; try again"),
        )
        for call in answer.tool_calls
    ]
    if "" in problems:
        told.append(ChatTurn(role="user", content=problems[""]))
    return told


class StepFields(TypedDict):
    """What every output of a step repeats from its task."""

    conversation: str
    step: int
    resume: int
    agent: str


@dataclass(frozen=True)
class Waiting:
    """A step that stopped at a tool call needing approval."""

    result: ToolResult

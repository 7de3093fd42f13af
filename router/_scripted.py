"""The ``scripted`` model: deterministic answers from a rules file, for demos and tests.

A rules file maps each agent to an ordered list of rules; the first rule whose ``when``
phrases (any of them, case-insensitive) occur in the latest user or tool message answers.
A rule with no ``when`` always matches. A rule may also give a ``pattern``, a regular
expression (case-insensitive) the message must contain; its named groups fill ``{name}``
fields in the answer's strings, so one rule can answer many messages.

The answer is the model's turn, made of native tool calls as a real provider sends them:
``{action: tool, tool: T, arguments: {...}}`` calls ``T``; ``{action: handoff, target: A,
confidence: c, reason: r, payload: {...}}`` calls ``transfer_to_A``; ``{action: reply,
text: t, confidence: c}`` calls ``reply``. A list of these is one turn of several calls; a
string is a plain assistant message. ``arguments`` given as a string are sent verbatim (to
play a model that writes broken JSON).

    agents:
      triage:
        - when: [refund, charged twice]
          answer: {action: handoff, target: payments, confidence: 0.93, reason: billing}
      payments:
        - pattern: "order (?P<order>\\d+)"
          answer: {action: tool, tool: refund, arguments: {order_id: "{order}", amount_cents: 4000}}
        - answer: {action: reply, text: "How can I help?", confidence: 0.5}
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.bus import Attempt, ChatToolCall
from corral.router._names import REPLY_TOOL, transfer_tool
from corral.router._types import Completion, CompletionRequest
from corral.router.errors import ScriptError


def _call(action: Any, number: int, key: str) -> ChatToolCall:
    if not isinstance(action, dict):
        raise ScriptError(f"a scripted tool call must be an object, not {action!r}")
    kind = action.get("action")
    if kind == "tool":
        name, arguments = str(action.get("tool", "")), action.get("arguments", {})
    elif kind == "handoff":
        name = transfer_tool(str(action.get("target", "")))
        arguments = {k: action[k] for k in ("reason", "confidence") if k in action}
        arguments.update(action.get("payload") or {})
    elif kind == "reply":
        name, arguments = (
            REPLY_TOOL,
            {k: action[k] for k in ("text", "confidence", "awaiting_customer") if k in action},
        )
    else:
        raise ScriptError(f"a scripted answer's action must be tool, handoff or reply, not {kind!r}")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ChatToolCall(id=f"call_{key}_{number}", name=name, arguments=text)


def scripted_turn(answer: Any, key: str) -> tuple[str, list[ChatToolCall]]:
    """A rule's answer as an assistant turn: (content, tool calls); ``key`` makes the
    calls' ids unique within the history."""
    if isinstance(answer, str):
        return answer, []
    actions = answer if isinstance(answer, list) else [answer]
    return "", [_call(action, number, key) for number, action in enumerate(actions)]


class ScriptRule(BaseModel):
    """One rule: when any phrase occurs in the customer's message, answer this."""

    model_config = ConfigDict(extra="forbid")

    when: list[str] = Field(default_factory=list)
    """Phrases, any of which must occur (case-insensitive); empty matches everything."""
    pattern: str | None = None
    """A regular expression the message must also contain; its named groups fill
    ``{group}`` fields of the answer's strings."""
    answer: dict[str, Any] | list[dict[str, Any]] | str
    """What the model says: one action, a list of them (one turn of several tool calls),
    or plain text."""
    sleep_s: float = Field(default=0.0, ge=0)
    """How long the model "thinks" before answering (to test long steps and crashes)."""
    cost_usd: float = Field(default=0.0, ge=0)
    """What the answer costs (to test budgets)."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {exc}") from exc
        return pattern

    @functools.cached_property
    def regex(self) -> re.Pattern[str] | None:
        """The compiled ``pattern``."""
        return re.compile(self.pattern, re.IGNORECASE) if self.pattern is not None else None

    def answer_for(self, groups: dict[str, str]) -> Any:
        """What the model says, with the pattern's named groups filled in."""
        return _fill(self.answer, groups) if groups else self.answer


class ScriptRules(BaseModel):
    """A whole rules file."""

    model_config = ConfigDict(extra="forbid")

    agents: dict[str, list[ScriptRule]]
    calls_log: str | None = None
    """A file (relative to the rules file) to which every answered call appends a JSON
    line, so tests can count model calls across processes."""


def load_rules(path: Path) -> ScriptRules:
    """Read and validate a rules file.

    Raises:
        ScriptError: if the file is missing or malformed, naming it.
    """
    try:
        raw = yaml.safe_load(path.read_text())
        rules = ScriptRules.model_validate(raw)
        if rules.calls_log is not None:
            rules = rules.model_copy(update={"calls_log": str(path.resolve().parent / rules.calls_log)})
        return rules
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ScriptError(f"scripted rules {path}: {exc}") from exc


class ScriptedModel:
    """Answers from rules with no I/O; plugs in at corral's own model interface.

    Args:
        rules: The rules to answer from.
        name: The model name reported in completions.
    """

    def __init__(self, rules: ScriptRules, name: str = "scripted") -> None:
        self._rules = rules
        self._name = name
        self.calls = 0
        """How many requests were answered (tests count model calls with it)."""

    def match(self, agent: str, messages: list[dict[str, Any]]) -> ScriptAnswer:
        """The answer to ``agent`` given chat ``messages`` (OpenAI's shape): the first rule
        that matches the latest user or tool message.

        Raises:
            ScriptError: if no rule of ``agent`` matches.
        """
        latest = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") in ("user", "tool")), ""
        )
        lowered = latest.lower()
        key = str(len(messages))
        for rule in self._rules.agents.get(agent, []):
            if rule.when and not any(phrase.lower() in lowered for phrase in rule.when):
                continue
            groups: dict[str, str] = {}
            if rule.regex is not None:
                found = rule.regex.search(latest)
                if found is None:
                    continue
                groups = {k: v for k, v in found.groupdict().items() if v is not None}
            content, calls = scripted_turn(rule.answer_for(groups), key)
            return ScriptAnswer(rule=rule, content=content, tool_calls=calls)
        raise ScriptError(f"no scripted rule for agent {agent!r} matches", model=self._name)

    async def respond(
        self, agent: str, messages: list[dict[str, Any]], conversation: str = ""
    ) -> ScriptAnswer:
        """Match, "think" for the rule's ``sleep_s``, count and log the call, return the answer."""
        answer = self.match(agent, messages)
        if answer.rule.sleep_s:
            await asyncio.sleep(answer.rule.sleep_s)
        self.calls += 1
        if self._rules.calls_log:
            line = json.dumps({"agent": agent, "conversation": conversation, "calls": len(messages)})
            with open(self._rules.calls_log, "a") as log:  # noqa: ASYNC230 - one short append
                log.write(line + "\n")
        return answer

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request`` from the rules (the ``Model`` interface), without litellm."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        answer = await self.respond(request.agent, messages, request.conversation)
        return Completion(
            content=answer.content,
            tool_calls=answer.tool_calls,
            model=self._name,
            input_tokens=sum(len(m["content"]) for m in messages) // 4,
            output_tokens=answer.size // 4,
            cost_usd=answer.rule.cost_usd,
            attempts=[Attempt(model=self._name, outcome="ok")],
        )


@dataclass(frozen=True, slots=True)
class ScriptAnswer:
    """What a scripted model says, and the rule that said it."""

    rule: ScriptRule
    content: str
    tool_calls: list[ChatToolCall]

    @property
    def size(self) -> int:
        """Characters of the turn (for its token count)."""
        return len(self.content) + sum(len(c.name) + len(c.arguments) for c in self.tool_calls)


def _fill(value: Any, groups: dict[str, str]) -> Any:
    """``value`` with ``{group}`` fields of its strings filled in (other braces kept)."""
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: groups.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _fill(v, groups) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, groups) for v in value]
    return value

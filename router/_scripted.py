"""The ``scripted`` model: deterministic answers from a rules file, for demos and tests.

A rules file maps each agent to an ordered list of rules; the first rule whose ``when``
phrases (any of them, case-insensitive) occur in the last user message answers. A rule
with no ``when`` always matches. A rule may also give a ``pattern``, a regular expression
(case-insensitive) the message must contain; its named groups fill ``{name}`` fields in
the answer's strings, so one rule can answer many messages. The answer is returned as the
model's text, JSON-encoded.

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

from corral.router._types import Completion, CompletionRequest
from corral.router.errors import ScriptError


class ScriptRule(BaseModel):
    """One rule: when any phrase occurs in the customer's message, answer this."""

    model_config = ConfigDict(extra="forbid")

    when: list[str] = Field(default_factory=list)
    """Phrases, any of which must occur (case-insensitive); empty matches everything."""
    pattern: str | None = None
    """A regular expression the message must also contain; its named groups fill
    ``{group}`` fields of the answer's strings."""
    answer: dict[str, Any] | str
    """What the model says: an object (sent as JSON) or plain text."""
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

    @functools.cached_property
    def text(self) -> str:
        """What the model says (for a rule without a pattern; see ``answer_for``)."""
        return self.answer if isinstance(self.answer, str) else json.dumps(self.answer)

    def answer_for(self, groups: dict[str, str]) -> str:
        """What the model says, with the pattern's named groups filled in."""
        if not groups:
            return self.text
        return (
            json.dumps(_fill(self.answer, groups))
            if not isinstance(self.answer, str)
            else _fill(self.answer, groups)
        )


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

    def match(self, agent: str, messages: list[dict[str, str]]) -> ScriptAnswer:
        """The answer to ``agent`` given chat ``messages``: the first rule that matches.

        Raises:
            ScriptError: if no rule of ``agent`` matches.
        """
        user_text = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        lowered = user_text.lower()
        for rule in self._rules.agents.get(agent, []):
            if rule.when and not any(phrase.lower() in lowered for phrase in rule.when):
                continue
            if rule.regex is None:
                return ScriptAnswer(rule=rule, text=rule.text)
            found = rule.regex.search(user_text)
            if found is not None:
                groups = {k: v for k, v in found.groupdict().items() if v is not None}
                return ScriptAnswer(rule=rule, text=rule.answer_for(groups))
        raise ScriptError(f"no scripted rule for agent {agent!r} matches", model=self._name)

    async def respond(
        self, agent: str, messages: list[dict[str, str]], conversation: str = ""
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
        """Answer ``request`` from the rules (the ``Model`` interface)."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        answer = await self.respond(request.agent, messages, request.conversation)
        return Completion(
            text=answer.text,
            model=self._name,
            input_tokens=sum(len(m["content"]) // 4 for m in messages),
            output_tokens=len(answer.text) // 4,
            cost_usd=answer.rule.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class ScriptAnswer:
    """What a scripted model says, and the rule that said it."""

    rule: ScriptRule
    text: str


def _fill(value: Any, groups: dict[str, str]) -> Any:
    """``value`` with ``{group}`` fields of its strings filled in (other braces kept)."""
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: groups.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _fill(v, groups) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, groups) for v in value]
    return value

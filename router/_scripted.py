"""The ``scripted`` model: deterministic answers from a rules file, for demos and tests.

A rules file maps each agent to an ordered list of rules; the first rule whose ``when``
phrases (any of them, case-insensitive) occur in the last user message answers. A rule
with no ``when`` always matches. The answer is returned as the model's text, JSON-encoded.

    agents:
      triage:
        - when: [refund, charged twice]
          answer: {action: handoff, target: payments, confidence: 0.93, reason: billing}
        - answer: {action: reply, text: "How can I help?", confidence: 0.5}
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router._types import Completion, CompletionRequest
from router.errors import ScriptError


class ScriptRule(BaseModel):
    """One rule: when any phrase occurs in the customer's message, answer this."""

    model_config = ConfigDict(extra="forbid")

    when: list[str] = Field(default_factory=list)
    """Phrases, any of which must occur (case-insensitive); empty matches everything."""
    answer: dict[str, Any] | str
    """What the model says: an object (sent as JSON) or plain text."""
    sleep_s: float = Field(default=0.0, ge=0)
    """How long the model "thinks" before answering (to test long steps and crashes)."""
    cost_usd: float = Field(default=0.0, ge=0)
    """What the answer costs (to test budgets)."""


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

    def match(self, agent: str, messages: list[dict[str, str]]) -> ScriptRule:
        """The rule that answers ``agent`` given chat ``messages``.

        Raises:
            ScriptError: if no rule of ``agent`` matches.
        """
        user_text = next(
            (m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), ""
        ).lower()
        for rule in self._rules.agents.get(agent, []):
            if not rule.when or any(phrase.lower() in user_text for phrase in rule.when):
                return rule
        raise ScriptError(f"no scripted rule for agent {agent!r} matches", model=self._name)

    async def respond(self, agent: str, messages: list[dict[str, str]], conversation: str = "") -> ScriptRule:
        """Match, "think" for the rule's ``sleep_s``, count and log the call, return the rule."""
        rule = self.match(agent, messages)
        if rule.sleep_s:
            await asyncio.sleep(rule.sleep_s)
        self.calls += 1
        if self._rules.calls_log:
            line = json.dumps({"agent": agent, "conversation": conversation, "calls": len(messages)})
            with open(self._rules.calls_log, "a") as log:  # noqa: ASYNC230 - one short append
                log.write(line + "\n")
        return rule

    @staticmethod
    def text(rule: ScriptRule) -> str:
        """What the model says for ``rule``."""
        return rule.answer if isinstance(rule.answer, str) else json.dumps(rule.answer)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request`` from the rules (the ``Model`` interface)."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        rule = await self.respond(request.agent, messages, request.conversation)
        text = self.text(rule)
        return Completion(
            text=text,
            model=self._name,
            input_tokens=sum(len(m["content"]) // 4 for m in messages),
            output_tokens=len(text) // 4,
            cost_usd=rule.cost_usd,
        )

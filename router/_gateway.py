"""The model gateway: the one place model calls happen, on the trusted side.

Agents ask for completions on ``corral.from.<agent>.model`` (request/reply); the sender is
the subject's token, which NATS permissions make unforgeable. For every call the gateway:

1. asks its ``Ledger`` whether the call may be made: the step must be the sender's running
   turn, the agent not killed, the conversation and the agent within their budgets; a call
   already journaled is answered from the journal (``replayed``), never asked again (the
   ledger may let a first call of a step without budgets through unchecked: the record
   checks the turn, and meters the call whatever it finds);
2. calls the tier's model, with the tier's retries, fallbacks and cooldowns, which every
   agent shares because every call passes here;
3. journals the answer with its true usage and cost before returning it, so the journal
   and the spend hold what the model said and cost, never what an agent claims.

It alone holds provider keys and imports litellm: agent processes hold neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from corral.bus import (
    DECODE_ERRORS,
    MAX_TOKENS_PER_RESPONSE,
    MAX_USD_PER_RESPONSE,
    Attempt,
    ChatToolCall,
    JournalEntry,
    ModelAnswer,
    ModelCall,
    Requester,
    RequestService,
    ToolSpec,
    clip,
    spans,
    subjects,
)
from corral.router._types import Completion, CompletionRequest, Model
from corral.router.errors import RouterError

logger = logging.getLogger(__name__)

_decoder: msgspec.json.Decoder[ModelCall] = msgspec.json.Decoder(ModelCall)

_N = TypeVar("_N", int, float)

OnAttempts = Callable[[str, Sequence[Attempt]], None]
"""Told of a call's attempts with the agent it was made for."""

MODEL_QUEUE = "router"
"""The queue group the gateway's replicas share calls in."""


@dataclass(frozen=True, kw_only=True)
class Admission:
    """Whether a model call may be made: its journaled answer (a replay), or why not, or
    neither (go ahead)."""

    journaled: JournalEntry | None = None
    refusal: str | None = None


class Ledger(Protocol):
    """Where the gateway checks and records model calls (PostgreSQL, in the supervisor's
    store)."""

    async def admit(self, call: ModelCall, sender: str) -> Admission:
        """Whether ``sender`` may make ``call`` now; its journaled answer if it was made."""
        ...

    async def record(self, entry: JournalEntry) -> JournalEntry | None:
        """Journal ``entry`` if its step is still its agent's running turn, and meter its
        spend in any case (it was paid for); the entry as journaled (an earlier write of the
        same key wins), or None if the turn is over."""
        ...


class ModelGateway(RequestService[ModelCall, ModelAnswer]):
    """Answer agents' model calls until ``shutdown()``.

    Args:
        nc: A NATS connection (the router's identity).
        models: The model of each tier.
        ledger: The journal and the budgets.
        offers: The tools each agent's model is offered (built from the config, as the
            agent builds them: an agent does not say what its model may call).
        tiers_of: The tiers each agent may ask for (its own, and the stronger ones it may
            escalate to); anything else is refused.
        js: Where dead letters go (default: ``nc``'s JetStream context).
        max_in_flight: Calls handled at once; a slow model holds one each.
        max_answer_bytes: The most an answer may hold (its text and its calls' arguments,
            ``limits.response_text_bytes``); a bigger one is journaled cut, with what it
            cost, and the call fails for good.
        on_attempts: Told of every call's attempts toward the models, with its agent, once
            the call is over (the supervisor's retry-storm detector, say).
    """

    def __init__(
        self,
        nc: Client,
        models: Mapping[str, Model],
        ledger: Ledger,
        tiers_of: Mapping[str, frozenset[str]],
        offers: Mapping[str, list[ToolSpec]],
        *,
        js: JetStreamContext | None = None,
        max_in_flight: int | None = 4096,
        max_answer_bytes: int = 64 * 1024,
        on_attempts: OnAttempts | None = None,
    ) -> None:
        super().__init__(
            nc, subjects.all_agent_models(), _decoder, js=js, queue=MODEL_QUEUE, max_in_flight=max_in_flight
        )
        self._models = models
        self._ledger = ledger
        self._tiers_of = tiers_of
        self._offers = offers
        self._max_answer_bytes = max_answer_bytes
        self._on_attempts = on_attempts
        self._in_flight: dict[tuple[str, str, int, int], asyncio.Future[ModelAnswer]] = {}

    async def _serve(self) -> None:
        logger.info(
            "model gateway serving %s (tiers: %s)",
            subjects.all_agent_models(),
            ", ".join(sorted(self._models)),
        )
        await super()._serve()

    def poison_answer(self, reason: str) -> ModelAnswer:
        """A call that does not decode is told so (and dead-lettered): it never will."""
        return ModelAnswer(status="failed", reason=f"the model call was refused: {reason}")

    async def answer(self, request: ModelCall, requester: Requester) -> ModelAnswer:
        """Check, call, journal and answer one model call (``handle``)."""
        return await self.handle(request, requester.sender)

    async def handle(self, call: ModelCall, sender: str) -> ModelAnswer:
        """The answer to ``sender``'s ``call``.

        The same call asked again while it is in flight here (the agent died and its step
        was redelivered, or it timed out waiting) joins the call in flight instead of
        calling the model a second time; once answered, the journal answers it.
        """
        key = (sender, call.conversation, call.step, call.index)
        running = self._in_flight.get(key)
        if running is None:
            running = asyncio.ensure_future(self._answer(call, sender))
            self._in_flight[key] = running
            running.add_done_callback(lambda _: self._in_flight.pop(key, None))
            return await asyncio.shield(running)
        answer = await asyncio.shield(running)
        return msgspec.structs.replace(answer, replayed=True) if answer.status == "ok" else answer

    async def _answer(self, call: ModelCall, sender: str) -> ModelAnswer:
        if call.agent != sender:
            return ModelAnswer(status="stopped", reason=f"the call claims to come from {call.agent!r}")
        model = self._models.get(call.tier)
        if model is None or call.tier not in self._tiers_of.get(sender, frozenset()):
            allowed = ", ".join(sorted(self._tiers_of.get(sender, ()))) or "none"
            return ModelAnswer(
                status="stopped", reason=f"tier {call.tier!r} is not {sender}'s (allowed: {allowed})"
            )
        admission = await self._ledger.admit(call, sender)
        if admission.journaled is not None:
            return answer_of(admission.journaled, replayed=True)
        if admission.refusal is not None:
            return ModelAnswer(status="stopped", reason=admission.refusal)
        started = time.time_ns()
        try:
            completion = await model.complete(
                CompletionRequest(
                    messages=call.messages,
                    tools=self._offers.get(sender, []),
                    agent=sender,
                    conversation=call.conversation,
                )
            )
        except RouterError as exc:
            logger.warning("tier %s failed for %s/%d: %s", call.tier, call.conversation, call.step, exc)
            self._attempted(call, sender, getattr(exc, "attempts", []) or [], started)
            return ModelAnswer(
                status="failed",
                tier=call.tier,
                model=exc.model or "",
                reason=str(exc),
                retryable=exc.retryable,
                attempts=list(getattr(exc, "attempts", []) or []),
            )
        except Exception as exc:
            # Not a provider's failure but a bug (of a model adapter, say): the step fails
            # with the reason, once, instead of waiting for an answer that never comes.
            logger.exception("tier %s raised for %s/%d", call.tier, call.conversation, call.step)
            return ModelAnswer(status="failed", tier=call.tier, reason=f"the model raised {exc!r}")
        self._attempted(call, sender, completion.attempts, started, completion)
        entry = entry_of(call, sender, completion)
        size = len(entry.text.encode()) + sum(len(c.arguments.encode()) for c in entry.tool_calls)
        too_big = size > self._max_answer_bytes
        if too_big:
            # Paid for, so journaled (what it cost counts), but cut: it is never acted on.
            note = f"\n[cut by corral: the answer was {size} bytes, over limits.response_text_bytes]"
            text = clip(entry.text, max(self._max_answer_bytes - len(note.encode()), 0)) + note
            entry = msgspec.structs.replace(entry, text=text, tool_calls=[], confidence=None)
        journaled = await self._ledger.record(entry)
        if journaled is None:
            return ModelAnswer(status="stopped", reason=f"step {call.step} is no longer {sender}'s turn")
        if too_big:
            return ModelAnswer(
                status="failed",
                tier=call.tier,
                model=entry.model,
                reason=f"the model's answer of {size} bytes exceeds limits.response_text_bytes "
                f"({self._max_answer_bytes})",
            )
        # Another call of the same key was journaled first (the agent asked again without
        # saying so): its answer is the one, and this call was paid for all the same.
        return answer_of(journaled, replayed=journaled is not entry)

    def _attempted(
        self,
        call: ModelCall,
        sender: str,
        attempts: list[Any],
        started_ns: int,
        completion: Completion | None = None,
    ) -> None:
        _attempt_spans(call, sender, attempts, started_ns, completion)
        if self._on_attempts is not None and attempts:
            try:
                self._on_attempts(sender, attempts)
            except Exception:
                logger.exception("the attempts' observer failed")


def _attempt_spans(
    call: ModelCall, sender: str, attempts: list[Any], started_ns: int, completion: Completion | None = None
) -> None:
    usage = None
    if completion is not None:
        usage = {
            spans.INPUT_TOKENS: completion.input_tokens,
            spans.OUTPUT_TOKENS: completion.output_tokens,
            spans.RESPONSE_MODEL: completion.model,
            "corral.cost_usd": completion.cost_usd,
        }
    spans.chat_attempts(
        call.conversation,
        attempts,
        agent=sender,
        tier=call.tier,
        started_ns=started_ns,
        ended_ns=time.time_ns(),
        usage_of_last=usage,
        messages=[{"role": t.role, "content": t.content} for t in call.messages]
        if spans.capture_content()
        else None,
        answer=completion.content if completion is not None and spans.capture_content() else None,
    )


def entry_of(call: ModelCall, sender: str, completion: Completion) -> JournalEntry:
    """The journal entry of ``completion``, the answer to ``call``."""
    # PostgreSQL stores no NUL in text: the answer is journaled, and acted on, with U+FFFD.
    content = completion.content.replace("\x00", "\ufffd")
    calls = [
        msgspec.structs.replace(c, arguments=c.arguments.replace("\x00", "\ufffd"))
        if "\x00" in c.arguments
        else c
        for c in completion.tool_calls
    ]
    return JournalEntry(
        conversation=call.conversation,
        step=call.step,
        index=call.index,
        agent=sender,
        text=content,
        model=completion.model,
        input_tokens=_sane(completion.input_tokens, MAX_TOKENS_PER_RESPONSE),
        output_tokens=_sane(completion.output_tokens, MAX_TOKENS_PER_RESPONSE),
        cost_usd=_sane(completion.cost_usd, MAX_USD_PER_RESPONSE),
        tool_calls=calls,
        tier=call.tier,
        confidence=claimed_confidence(calls),
        attempts=completion.attempts,
    )


def _sane(value: _N, high: _N) -> _N:
    """A provider's figure as it can be journaled: within 0..``high`` (NaN: 0)."""
    if not value >= 0:  # negative, or NaN
        logger.warning("a model reported %r as its usage; journaled as 0", value)
        return type(value)(0)
    return min(value, high)


def answer_of(entry: JournalEntry, *, replayed: bool) -> ModelAnswer:
    """What the agent is told of a journaled answer."""
    return ModelAnswer(
        status="ok",
        content=entry.text,
        tool_calls=entry.tool_calls,
        model=entry.model,
        tier=entry.tier,
        input_tokens=entry.input_tokens,
        output_tokens=entry.output_tokens,
        cost_usd=entry.cost_usd,
        replayed=replayed,
        attempts=entry.attempts,
    )


_confidence = msgspec.json.Decoder(dict[str, object])


def claimed_confidence(calls: list[ChatToolCall]) -> float | None:
    """The confidence an answer claims: that of its first call carrying a number in
    ``confidence`` (a reply or a transfer), or None."""
    for call in calls:
        try:
            value = _confidence.decode(call.arguments).get("confidence")
        except DECODE_ERRORS:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return float(value)
    return None

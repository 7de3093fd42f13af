"""The supervisor's desk for step outputs.

An agent hands the output of a step (a proposed handoff, a reply, a failure, a wait for
approval) to the supervisor as a request and keeps its task unacknowledged until the
answer. The supervisor answers ``taken`` only once the decision is committed in
PostgreSQL and the messages it implies are stored in JetStream; so the output is as
durable as a stored message, at the cost of one commit instead of a stored message plus
a commit. Outcomes of one request:

* taken: decided (or found decided before: a repeat changes nothing), committed, published;
* the body does not decode (nesting too deep included), or taking it fails in a way that
  ``is_retryable`` says cannot change (``PoisonMessageError``, a limit, a bad value):
  copied to ``corral.dlq.<subject>`` with the reason, its conversation ended with the
  reason (``refused``), and answered ``refused``;
* anything else fails: answered ``retry``; the agent sends it again, and once it has sent
  it ``max_deliver`` times the output is dead-lettered, its conversation ended and the
  output refused instead;
* the supervisor is down or does not answer: the agent sends it again until it answers.

A refused output is never acked into silence: if it decoded, ``refused`` ends its
conversation with the reason; if it did not, the agent (told ``refused``) reports the
step as failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from corral.bus import (
    ATTEMPT,
    DECODE_ERRORS,
    AgentOutput,
    Limits,
    MessageService,
    OutputTaken,
    dead_letter,
    encode,
    is_retryable,
    subjects,
    traceparent_from,
    use_traceparent,
)

logger = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(AgentOutput)

Take = Callable[[AgentOutput, str], Awaitable[None]]
"""Decide on an output (from the subject it came on), commit, publish what it implies."""
Refused = Callable[[AgentOutput, str, str], Awaitable[None]]
"""Told of an output (from the subject it came on) refused for good, with the reason."""

_REASON_CHARS = 1000


class OutputDesk(MessageService):
    """Answer agents' step outputs until ``shutdown()``.

    Args:
        nc: The supervisor's NATS connection.
        js: Its JetStream context (for dead letters).
        take: What to do with each output.
        max_in_flight: Outputs handled at once; the rest wait in the subscription's queue.
        max_deliver: Failed attempts before an output is dead-lettered.
        refused: What to do about an output refused for good (end its conversation).
        limits: The bound of a dead letter's body.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        take: Take,
        *,
        max_in_flight: int = 64,
        max_deliver: int = 10,
        refused: Refused | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(nc, subjects.agent_outputs(), queue="supervisor", max_in_flight=max_in_flight)
        self._js = js
        self._take = take
        self._max_deliver = max_deliver
        self._refused = refused
        self._limits = limits or Limits()

    async def on_message(self, msg: Msg) -> None:
        """Take one output and answer it (no answer if even that fails: the agent retries)."""
        try:
            await self._answer(msg)
        except Exception:
            logger.exception("could not answer an output on %s; the agent will send it again", msg.subject)

    async def _answer(self, msg: Msg) -> None:
        sender = subjects.sender(msg.subject) or ""
        if not subjects.is_agent_inbox(sender, msg.reply):
            why = f"answer subject {msg.reply!r} is not {sender}'s inbox" if msg.reply else "not a request"
            await self._refuse(msg, why, answer=False)
            return
        try:
            output = _decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            await self._refuse(msg, f"decode error: {exc}")
            return
        headers = msg.headers or {}
        with use_traceparent(traceparent_from(headers)):
            try:
                await self._take(output, msg.subject)
            except Exception as exc:
                why = _clip(f"{type(exc).__name__}: {exc}")
                if not is_retryable(exc):
                    logger.warning("refused an output on %s: %s", msg.subject, why)
                    await self._refuse(msg, why, output)
                    return
                attempt = _attempt(headers)
                logger.warning("output on %s failed (attempt %d): %s", msg.subject, attempt, why)
                if attempt >= self._max_deliver:
                    await self._refuse(msg, f"gave up after {attempt} deliveries: {why}", output)
                else:
                    await msg.respond(encode(OutputTaken(status="retry", reason=_clip(str(exc)))))
                return
        await msg.respond(encode(OutputTaken(status="taken")))

    async def _refuse(
        self, msg: Msg, reason: str, output: AgentOutput | None = None, *, answer: bool = True
    ) -> None:
        # Kept first (if that fails, nothing is answered and the agent sends it again),
        # then its conversation ended, then the agent told.
        await dead_letter(
            self._js,
            subjects.dead_letter(msg.subject),
            msg,
            reason,
            max_body_bytes=self._limits.dead_letter_body_bytes,
        )
        if output is not None and self._refused is not None:
            try:
                await self._refused(output, msg.subject, reason)
            except Exception:
                logger.exception("could not end the conversation of a refused output on %s", msg.subject)
        if answer:
            await msg.respond(encode(OutputTaken(status="refused", reason=reason)))


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else f"{text[:_REASON_CHARS]}..."


def _attempt(headers: dict[str, str]) -> int:
    try:
        return max(1, int(headers.get(ATTEMPT, "1")))
    except ValueError:
        return 1

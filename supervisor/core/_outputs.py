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
* the supervisor is down or does not answer: the agent sends it again until it answers;
* it asks for its answer outside its sender's own inbox: copied to the dead-letter subject
  with the reason and never answered (``RequestService``, as for every request).

A refused output is never acked into silence: if it decoded, ``refused`` ends its
conversation with the reason; if it did not, the agent (told ``refused``) reports the
step as failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from corral.bus import (
    AgentOutput,
    Limits,
    OutputTaken,
    Requester,
    RequestService,
    is_retryable,
    subjects,
)

logger = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(AgentOutput)

Take = Callable[[AgentOutput, str], Awaitable[None]]
"""Decide on an output (from the subject it came on), commit, publish what it implies."""
Refused = Callable[[AgentOutput, str, str], Awaitable[None]]
"""Told of an output (from the subject it came on) refused for good, with the reason."""

_REASON_CHARS = 1000


class OutputDesk(RequestService[AgentOutput, OutputTaken]):
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
        self._limits = limits or Limits()
        super().__init__(
            nc,
            subjects.agent_outputs(),
            _decoder,
            js=js,
            queue="supervisor",
            max_in_flight=max_in_flight,
            dead_letter_body_bytes=self._limits.dead_letter_body_bytes,
        )
        self._take = take
        self._max_deliver = max_deliver
        self._refused = refused

    def poison_answer(self, reason: str) -> OutputTaken:
        """An output that does not decode can never be taken: ``refused``, so that the agent
        reports its step as failed instead of sending it again."""
        return OutputTaken(status="refused", reason=reason)

    async def answer(self, request: AgentOutput, requester: Requester) -> OutputTaken:
        """Take one output: ``taken``, ``retry`` or (dead-lettered first) ``refused``.

        Raises:
            BusError: the dead letter of a refused output could not be stored (no answer:
                the agent sends it again).
        """
        try:
            await self._take(request, requester.subject)
        except Exception as exc:
            why = _clip(f"{type(exc).__name__}: {exc}")
            if not is_retryable(exc):
                logger.warning("refused an output on %s: %s", requester.subject, why)
                return await self._refuse(requester, why, request)
            attempt = requester.attempt
            logger.warning("output on %s failed (attempt %d): %s", requester.subject, attempt, why)
            if attempt >= self._max_deliver:
                return await self._refuse(requester, f"gave up after {attempt} deliveries: {why}", request)
            return OutputTaken(status="retry", reason=_clip(str(exc)))
        return OutputTaken(status="taken")

    async def _refuse(self, requester: Requester, reason: str, output: AgentOutput) -> OutputTaken:
        # Kept first (if that fails, nothing is answered and the agent sends it again),
        # then its conversation ended, then the agent told.
        await self.dead_letter(requester, reason)
        if self._refused is not None:
            try:
                await self._refused(output, requester.subject, reason)
            except Exception:
                logger.exception(
                    "could not end the conversation of a refused output on %s", requester.subject
                )
        return OutputTaken(status="refused", reason=reason)


def _clip(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else f"{text[:_REASON_CHARS]}..."

"""Typed request/reply between an agent and the supervisor's services.

The client side is ``request()``: a wire message in, the reply decoded into its type out,
checked for size first and carrying the current ``traceparent``. The serving side is
``RequestService``: it owns the preamble every such service shares, so that each answers
one typed ``answer(request, requester)``:

* the sender is the subject's token (``corral.from.<agent>.…``), which NATS permissions
  make unforgeable, never the body's claim;
* a request that names a reply subject outside its sender's own inbox, or none, is
  poison (a hostile agent could otherwise have the supervisor publish wherever the
  supervisor may): dead-lettered with the reason, never answered;
* a body that does not decode (nesting too deep included) is poison too: dead-lettered
  with the decode error, and answered with ``poison_answer()`` (None by default: no
  answer);
* ``answer()`` runs in the requester's trace context; what it returns is the answer
  (None: no answer, the requester asks again); what it raises is logged and not
  answered, so the requester asks again.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from corral.bus import subjects
from corral.bus._consumer import DEAD_LETTER_BODY_BYTES, DECODE_ERRORS, dead_letter
from corral.bus._messages import Message, encode
from corral.bus._publish import ATTEMPT, check_payload, translate
from corral.bus._service import MessageService
from corral.bus._trace import TRACEPARENT, current_traceparent, traceparent_from, use_traceparent
from corral.bus.errors import PoisonMessageError

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Rep = TypeVar("Rep", bound=msgspec.Struct)

_reply_encoder = msgspec.json.Encoder()
_reply_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


async def request(
    nc: Client,
    subject: str,
    message: Message | bytes,
    reply_type: type[Rep],
    *,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
) -> Rep:
    """Send a request and return its answer as ``reply_type``.

    Args:
        nc: The NATS connection.
        subject: Where to ask (from ``bus.subjects``).
        message: A wire message, or one encoded already (sent again as it is).
        reply_type: The answer's type.
        timeout_s: How long to wait for the answer.
        headers: Headers to send; ``traceparent`` is the current one unless given.

    Raises:
        PayloadTooLargeError: the request with its headers is over ``max_payload``.
        PoisonMessageError: the answer does not decode as ``reply_type``.
        ConnectionClosedError: the connection is closed for good.
        BusError: no answer in time, or nobody listening (``retryable``).
    """
    data = message if isinstance(message, bytes) else encode(message)
    sent = dict(headers or {})
    trace = current_traceparent()
    if trace and TRACEPARENT not in sent:
        sent[TRACEPARENT] = trace
    check_payload(nc, subject, data, sent)
    try:
        answer = await nc.request(subject, data, timeout=timeout_s, headers=sent or None)
    except Exception as exc:
        raise translate(exc, "request", subject) from exc
    decoder = _reply_decoders.get(reply_type)
    if decoder is None:
        decoder = _reply_decoders.setdefault(reply_type, msgspec.json.Decoder(reply_type))
    try:
        reply: Rep = decoder.decode(answer.data)
    except DECODE_ERRORS as exc:
        raise PoisonMessageError(
            f"the answer on {subject} is not a {reply_type.__name__}: {exc}", subject=subject
        ) from exc
    return reply


@dataclass(kw_only=True)
class Requester:
    """Who sent a request (the subject's sender), and what came with it."""

    sender: str
    """The agent of the ``corral.from.<agent>.…`` subject ("" on any other subject)."""
    subject: str
    headers: Mapping[str, str]
    msg: Msg
    _after: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)

    @property
    def attempt(self) -> int:
        """How many times the requester has sent it (its ``Corral-Attempt`` header; 1 if none)."""
        try:
            return max(1, int(self.headers.get(ATTEMPT, "1")))
        except ValueError:
            return 1

    def after_answer(self, then: Callable[[], Awaitable[None]]) -> None:
        """Run ``then`` once the answer is sent (the requester first, news after); not if
        nothing is answered. A failure of ``then`` is logged."""
        self._after.append(then)


class RequestService(MessageService, Generic[Req, Rep]):
    """Answer typed requests from agents on ``subject`` until ``shutdown()``.

    Args:
        nc: The NATS connection (the supervisor's identity).
        subject: What to serve (``corral.from.*.<kind>`` wildcards).
        decoder: Decoder of the request type (a union of several is fine).
        js: Where dead letters go (default: ``nc``'s JetStream context).
        queue: The queue group replicas share the work in.
        grace_s: How long in-flight requests may take on shutdown.
        max_in_flight: Requests handled at once (None: no limit).
        dead_letter_body_bytes: The bound of a dead letter's copied body.
    """

    def __init__(
        self,
        nc: Client,
        subject: str | Sequence[str],
        decoder: msgspec.json.Decoder[Req],
        *,
        js: JetStreamContext | None = None,
        queue: str = "",
        grace_s: float = 10.0,
        max_in_flight: int | None = None,
        dead_letter_body_bytes: int = DEAD_LETTER_BODY_BYTES,
    ) -> None:
        super().__init__(nc, subject, queue=queue, grace_s=grace_s, max_in_flight=max_in_flight)
        self._decoder = decoder
        self._js = js
        self._dead_letter_body_bytes = dead_letter_body_bytes

    @abstractmethod
    async def answer(self, request: Req, requester: Requester) -> Rep | None:
        """The answer to one request (None: no answer; the requester asks again)."""

    def poison_answer(self, reason: str) -> Rep | None:
        """What a requester is told of a request dead-lettered as poison (None: nothing)."""
        return None

    def answers_to(self, requester: Requester, reply: str) -> bool:
        """Whether an answer may go to ``reply``: the sending agent's own inbox (a service
        whose requesters are not agents says whose)."""
        return subjects.is_agent_inbox(requester.sender, reply)

    async def on_message(self, msg: Msg) -> None:
        """Check, decode and answer one request (see the module's docstring)."""
        headers = dict(msg.headers or {})
        requester = Requester(
            sender=subjects.sender(msg.subject) or "", subject=msg.subject, headers=headers, msg=msg
        )
        if not msg.reply or not self.answers_to(requester, msg.reply):
            why = (
                f"answer subject {msg.reply!r} is not {requester.sender or 'the sender'}'s inbox"
                if msg.reply
                else "not a request (no answer subject)"
            )
            await self.dead_letter(requester, why)
            return
        try:
            request = self._decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            why = f"decode error: {exc}"
            await self.dead_letter(requester, why)
            await self._send(requester, self.poison_answer(why))
            return
        with use_traceparent(traceparent_from(headers)):
            try:
                reply = await self.answer(request, requester)
            except Exception:
                logger.exception(
                    "%s failed on a request from %s; not answered", type(self).__name__, msg.subject
                )
                return
            await self._send(requester, reply)

    async def dead_letter(self, requester: Requester, reason: str) -> None:
        """Copy the request to ``corral.dlq.<its subject>`` with ``reason``; returns once the
        copy is stored.

        Raises:
            BusError: the copy could not be stored (nothing is answered then, so the
                requester asks again and the copy is tried again).
        """
        if self._js is None:
            self._js = self._nc.jetstream()
        try:
            await dead_letter(
                self._js,
                subjects.dead_letter(requester.subject),
                requester.msg,
                reason,
                max_body_bytes=self._dead_letter_body_bytes,
            )
        except Exception as exc:
            raise translate(exc, "dead letter", subjects.dead_letter(requester.subject)) from exc

    async def _send(self, requester: Requester, reply: Rep | None) -> None:
        if reply is None:
            return
        await requester.msg.respond(_reply_encoder.encode(reply))
        for then in requester._after:
            try:
                await then()
            except Exception:
                logger.exception("after answering %s", requester.subject)

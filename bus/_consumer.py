"""A durable pull consumer that decodes, dispatches, acks, and dead-letters.

Outcomes of one delivery:

* the handler returns: ack;
* the message does not decode (nesting too deep included), or the handler raises what
  ``is_retryable`` says is not retryable: copy it to ``corral.dlq.<subject>`` with the
  reason, then terminate it;
* the handler raises anything else: nak with a delay, and dead-letter it once it has
  been delivered ``max_deliver`` times (JetStream has no dead-letter queue of its own);
* cancellation: nothing; JetStream redelivers after ``ack_wait``.

A decoded message that is dead-lettered is also handed to ``on_dead`` (the supervisor ends
its conversation with the reason), so an input never ends in the dead-letter queue alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from corral.bus import subjects
from corral.bus._config import KiB
from corral.bus._publish import check_payload, payload_size
from corral.bus._service import Service, finish_in_flight
from corral.bus._trace import TRACEPARENT, traceparent_from, use_traceparent
from corral.bus.errors import BusError, is_retryable

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEAD_REASON = "Corral-Dead-Reason"
DEAD_SUBJECT = "Corral-Dead-Subject"
DEAD_STREAM_SEQ = "Corral-Dead-Stream-Seq"
DEAD_TRUNCATED = "Corral-Dead-Truncated"
"""Set on a dead letter whose body was cut to the bound: the original body's size."""
DEAD_LETTER_BODY_BYTES = 64 * KiB
"""The default bound of a dead letter's copied body."""
_REASON_CHARS = 4000

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
"""What a decoder raises on bad input: msgspec raises RecursionError, not DecodeError, on
nesting too deep (even in a field it would ignore)."""


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """What a handler knows about the delivery besides the decoded message."""

    subject: str
    headers: dict[str, str]
    attempt: int
    """1 on first delivery, higher on redelivery."""
    msg: Msg

    async def in_progress(self) -> None:
        """Extend the ack deadline for a long step."""
        await self.msg.in_progress()

    @contextlib.asynccontextmanager
    async def kept_alive(self, every_s: float) -> AsyncIterator[None]:
        """Keep this delivery from being redelivered while the block runs (an in-progress
        ack every ``every_s``): for a handler that may take longer than ``ack_wait``."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(every_s)
                with contextlib.suppress(Exception):  # a missed beat only risks a redelivery
                    await self.in_progress()

        beating = asyncio.create_task(beat())
        try:
            yield
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)


Handler = Callable[[T, Delivery], Awaitable[None]]
OnDead = Callable[[T, Delivery, str], Awaitable[None]]
"""Told of a decoded message that was dead-lettered, with the reason."""


class ConsumerState(enum.Enum):
    """Lifecycle of a ``Consumer``."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, kw_only=True)
class ConsumerConfig:
    """How a ``Consumer`` reads."""

    stream: str
    durable: str
    max_in_flight: int = 64
    """Messages handled concurrently by this process."""
    fetch_timeout_s: float = 1.0
    max_deliver: int = 10
    """Must match the durable consumer's ``max_deliver``."""
    retry_delay_s: float = 1.0
    dead_letter_subject: Callable[[str], str] = subjects.dead_letter
    """Maps a subject to its dead-letter subject (agents keep to their own namespace)."""
    shutdown_grace_s: float = 10.0
    dead_letter_body_bytes: int = DEAD_LETTER_BODY_BYTES
    """A dead letter keeps at most this much of the body (``limits.dead_letter_body_bytes``)."""


class Consumer(Service, Generic[T]):
    """Serve one durable consumer until ``shutdown()`` (which returns once in-flight
    messages ended, or were cancelled past ``shutdown_grace_s``).

    Args:
        js: JetStream context.
        config: Which consumer, and how many messages at once.
        decoder: Decoder of the subject family's union.
        handler: Coroutine called with each decoded message.
        on_dead: Coroutine told of each decoded message that was dead-lettered.
    """

    def __init__(
        self,
        js: JetStreamContext,
        config: ConsumerConfig,
        decoder: msgspec.json.Decoder[T],
        handler: Handler[T],
        on_dead: OnDead[T] | None = None,
    ) -> None:
        super().__init__()
        self._js = js
        self._config = config
        self._decoder = decoder
        self._handler = handler
        self._on_dead = on_dead
        self._tasks: set[asyncio.Task[None]] = set()
        self._refill_at = max(1, config.max_in_flight // 4)
        self.state = ConsumerState.NEW

    async def _serve(self) -> None:
        """Fetch and handle messages; returns after ``shutdown()`` once in-flight work ended.

        Raises:
            BusError: if the durable consumer cannot be bound.
        """
        self.state = ConsumerState.RUNNING
        try:
            sub = await self._js.pull_subscribe_bind(durable=self._config.durable, stream=self._config.stream)
        except Exception as exc:
            self.state = ConsumerState.STOPPED
            raise BusError(
                f"cannot bind to consumer {self._config.durable} on {self._config.stream}: {exc}"
            ) from exc
        self._started.set()
        try:
            while not self._stopping.is_set():
                free = self._config.max_in_flight - len(self._tasks)
                if free < self._refill_at and self._tasks:
                    # Busy: fetch again once a quarter of the slots are free, not after
                    # every message (each fetch is a round trip to the server).
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(batch=free, timeout=self._config.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    continue
                except Exception as exc:
                    # Server restarts, leader elections, reconnects: the client recovers on
                    # its own, so wait a moment rather than spin or die.
                    logger.warning("fetch from %s failed: %s; retrying", self._config.durable, exc)
                    await _wait_or(self._stopping, self._config.retry_delay_s)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._deliver(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self.state = ConsumerState.STOPPING
            await finish_in_flight(self._tasks, self._config.shutdown_grace_s)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.state = ConsumerState.STOPPED

    def _is_own_task(self, task: asyncio.Task[Any] | None) -> bool:
        return super()._is_own_task(task) or task in self._tasks

    async def _deliver(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except Exception:
            # Acking, naking or dead-lettering failed (the connection dropped): the message
            # stays unacknowledged and JetStream redelivers it after ack_wait.
            logger.warning(
                "could not settle a message from %s; it will be redelivered", msg.subject, exc_info=True
            )

    async def _handle(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        try:
            attempt = msg.metadata.num_delivered
        except Exception:
            attempt = 1
        try:
            message = self._decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            await self._dead_letter(msg, f"decode error: {exc}")
            return
        delivery = Delivery(subject=msg.subject, headers=headers, attempt=attempt, msg=msg)
        with use_traceparent(traceparent_from(headers)):
            try:
                await self._handler(message, delivery)
            except Exception as exc:
                if not is_retryable(exc):
                    logger.warning("dead-lettering %s: %s: %s", msg.subject, type(exc).__name__, exc)
                    await self._give_up(message, delivery, f"{type(exc).__name__}: {exc}")
                    return
                if attempt >= self._config.max_deliver:
                    logger.warning("giving up on %s after %d deliveries: %s", msg.subject, attempt, exc)
                    await self._give_up(
                        message, delivery, f"gave up after {attempt} deliveries: {type(exc).__name__}: {exc}"
                    )
                    return
                logger.warning(
                    "handler failed on %s (attempt %d): %s", msg.subject, attempt, exc, exc_info=exc
                )
                await msg.nak(delay=self._config.retry_delay_s * attempt)
                return
        await msg.ack()

    async def _give_up(self, message: T, delivery: Delivery, reason: str) -> None:
        await self._dead_letter(delivery.msg, reason)
        if self._on_dead is None:
            return
        try:
            await self._on_dead(message, delivery, reason)
        except Exception:
            # The dead letter is kept, with its reason; the conversation is the operator's.
            logger.exception("could not act on the dead letter from %s", delivery.subject)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        """Copy ``msg`` to the dead-letter subject, then terminate it.

        The copy happens first: if it fails the message is left unacked and redelivered,
        so a dead letter is never lost between the two.
        """
        stream_seq = None
        with contextlib.suppress(Exception):
            stream_seq = msg.metadata.sequence.stream
        await dead_letter(
            self._js,
            self._config.dead_letter_subject(msg.subject),
            msg,
            reason,
            stream_seq=stream_seq,
            max_body_bytes=self._config.dead_letter_body_bytes,
        )
        await msg.term()


async def dead_letter(
    js: JetStreamContext,
    dead_subject: str,
    msg: Msg,
    reason: str,
    *,
    stream_seq: int | None = None,
    max_body_bytes: int = DEAD_LETTER_BODY_BYTES,
) -> None:
    """Store a copy of ``msg`` on ``dead_subject`` with why it died, where it came from and
    its trace; returns once the copy is stored.

    The copy keeps at most ``max_body_bytes`` of the body (and never more than the server's
    ``max_payload`` leaves room for beside the headers); a cut body says so in
    ``Corral-Dead-Truncated``, with the original size.
    """
    headers = {DEAD_REASON: _header_value(reason)[:_REASON_CHARS], DEAD_SUBJECT: _header_value(msg.subject)}
    if stream_seq is not None:
        headers[DEAD_STREAM_SEQ] = str(stream_seq)
    trace = traceparent_from(msg.headers)
    if trace:
        headers[TRACEPARENT] = trace
    data = msg.data
    nc = getattr(js, "_nc", None)  # the context's connection (nats-py keeps it there)
    room = max_body_bytes
    if nc is not None and nc.max_payload:
        # Leave room for the header that says the body was cut.
        room = min(room, nc.max_payload - payload_size(b"", {**headers, DEAD_TRUNCATED: str(len(data))}))
    if len(data) > room:
        headers[DEAD_TRUNCATED] = str(len(data))
        data = data[: max(room, 0)]
    if nc is not None:
        check_payload(nc, dead_subject, data, headers)
    await js.publish(dead_subject, data, headers=headers)
    logger.warning("dead-lettered a message from %s: %s", msg.subject, reason)


def _header_value(value: str) -> str:
    """A header value that cannot break the header block (nats-py strips CR and LF only)
    and reads back as the same text: printable ASCII, anything else escaped (``\\xfc``)."""
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


async def _wait_or(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)

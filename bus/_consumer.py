"""A durable pull consumer that decodes, dispatches, acks, and dead-letters.

Outcomes of one delivery:

* the handler returns: ack;
* the message does not decode, or the handler raises a non-retryable ``CorralError``:
  copy it to ``corral.dlq.<subject>`` with the reason, then terminate it;
* the handler raises anything else: nak with a delay, and dead-letter it once it has
  been delivered ``max_deliver`` times (JetStream has no dead-letter queue of its own);
* cancellation: nothing; JetStream redelivers after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus import subjects
from bus._trace import TRACEPARENT, traceparent_from, use_traceparent
from bus.errors import BusError, CorralError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEAD_REASON = "Corral-Dead-Reason"
DEAD_SUBJECT = "Corral-Dead-Subject"
DEAD_STREAM_SEQ = "Corral-Dead-Stream-Seq"


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


Handler = Callable[[T, Delivery], Awaitable[None]]


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


class Consumer(Generic[T]):
    """Serve one durable consumer until ``shutdown()``.

    Args:
        js: JetStream context.
        config: Which consumer, and how many messages at once.
        decoder: Decoder of the subject family's union.
        handler: Coroutine called with each decoded message.
    """

    def __init__(
        self,
        js: JetStreamContext,
        config: ConsumerConfig,
        decoder: msgspec.json.Decoder[T],
        handler: Handler[T],
    ) -> None:
        self._js = js
        self._config = config
        self._decoder = decoder
        self._handler = handler
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refill_at = max(1, config.max_in_flight // 4)
        self.state = ConsumerState.NEW

    async def run(self) -> None:
        """Fetch and handle messages; returns after ``shutdown()`` once in-flight work ended."""
        self.state = ConsumerState.RUNNING
        try:
            sub = await self._js.pull_subscribe_bind(durable=self._config.durable, stream=self._config.stream)
        except Exception as exc:
            raise BusError(
                f"cannot bind to consumer {self._config.durable} on {self._config.stream}: {exc}"
            ) from exc
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
            await self._finish_in_flight()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.state = ConsumerState.STOPPED

    async def shutdown(self) -> None:
        """Stop fetching; in-flight messages get ``shutdown_grace_s`` to finish."""
        self._stopping.set()

    async def _finish_in_flight(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self._config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

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
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._dead_letter(msg, f"decode error: {exc}")
            return
        delivery = Delivery(subject=msg.subject, headers=headers, attempt=attempt, msg=msg)
        with use_traceparent(traceparent_from(headers)):
            try:
                await self._handler(message, delivery)
            except CorralError as exc:
                if not exc.retryable:
                    logger.warning("dead-lettering %s: %s", msg.subject, exc)
                    await self._dead_letter(msg, f"{type(exc).__name__}: {exc}")
                    return
                await self._retry(msg, attempt, exc)
                return
            except Exception as exc:
                logger.exception("handler failed on %s (attempt %d)", msg.subject, attempt)
                await self._retry(msg, attempt, exc)
                return
        await msg.ack()

    async def _retry(self, msg: Msg, attempt: int, exc: BaseException) -> None:
        if attempt >= self._config.max_deliver:
            await self._dead_letter(msg, f"gave up after {attempt} deliveries: {type(exc).__name__}: {exc}")
            return
        await msg.nak(delay=self._config.retry_delay_s * attempt)

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
        )
        await msg.term()


async def dead_letter(
    js: JetStreamContext, dead_subject: str, msg: Msg, reason: str, *, stream_seq: int | None = None
) -> None:
    """Store a copy of ``msg`` on ``dead_subject`` with why it died, where it came from and
    its trace; returns once the copy is stored."""
    headers = {DEAD_REASON: reason[:4000], DEAD_SUBJECT: msg.subject}
    if stream_seq is not None:
        headers[DEAD_STREAM_SEQ] = str(stream_seq)
    trace = traceparent_from(msg.headers)
    if trace:
        headers[TRACEPARENT] = trace
    await js.publish(dead_subject, msg.data, headers=headers)
    logger.warning("dead-lettered a message from %s: %s", msg.subject, reason)


async def _wait_or(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)

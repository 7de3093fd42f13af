"""Dead letters for messages JetStream gave up on.

A consumer whose process keeps dying never gets to dead-letter the message it dies on;
after ``max_deliver`` attempts JetStream simply stops delivering it and says so in a
``MAX_DELIVERIES`` advisory. This watcher turns each advisory into a dead letter (the
original message, with the reason), removes the message from the work stream, raises
an alert event, and lets the caller act on it (e.g. escalate the conversation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from corral.bus import subjects
from corral.bus._consumer import DEAD_REASON, DEAD_STREAM_SEQ, DEAD_SUBJECT, DECODE_ERRORS
from corral.bus._messages import Alert, encode
from corral.bus._service import MessageService

logger = logging.getLogger(__name__)

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


class MaxDeliveries(msgspec.Struct, frozen=True):
    """The fields of JetStream's advisory we use (converted once, at the edge)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_decoder = msgspec.json.Decoder(MaxDeliveries)

OnDead = Callable[[str, bytes, str], Awaitable[None]]
"""Called with (original subject, original data, reason) after the dead letter is stored."""


class MaxDeliveriesWatcher(MessageService):
    """Watch ``stream``'s consumers for messages JetStream gave up on.

    Args:
        nc: NATS connection (needs subscribe on the advisory subject).
        js: JetStream context (reads, dead-letters and deletes the message).
        stream: The stream to watch.
        on_dead: Optional follow-up for each dead letter.
    """

    def __init__(self, nc: Client, js: JetStreamContext, stream: str, on_dead: OnDead | None = None) -> None:
        super().__init__(nc, f"{ADVISORY}.{stream}.*")
        self._js = js
        self._on_dead = on_dead

    async def on_message(self, msg: Msg) -> None:
        """Turn one advisory into a dead letter, an alert and the caller's follow-up."""
        try:
            advisory = _decoder.decode(msg.data)
        except DECODE_ERRORS:
            logger.warning("unreadable advisory on %s", msg.subject)
            return
        try:
            original = await self._js.get_msg(advisory.stream, advisory.stream_seq)
        except Exception:
            return  # already dead-lettered by its consumer, or removed
        subject = original.subject or ""
        reason = (
            f"JetStream gave up after {advisory.deliveries} deliveries to {advisory.consumer} "
            "(its process kept failing)"
        )
        headers = {DEAD_REASON: reason, DEAD_SUBJECT: subject, DEAD_STREAM_SEQ: str(advisory.stream_seq)}
        await self._js.publish(subjects.dead_letter(subject), original.data or b"", headers=headers)
        with contextlib.suppress(Exception):
            await self._js.delete_msg(advisory.stream, advisory.stream_seq)
        alert = Alert(kind="max_deliveries", subject=subject, consumer=advisory.consumer, reason=reason)
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.alerts(), encode(alert))
        logger.error("dead-lettered %s: %s", subject, reason)
        if self._on_dead is not None:
            await self._on_dead(subject, original.data or b"", reason)

"""Publishing wire messages to JetStream with dedup ids and trace context."""

from __future__ import annotations

import contextlib

from nats.aio.client import Client
from nats.js import JetStreamContext

from bus._messages import Message, encode
from bus._trace import TRACEPARENT, current_traceparent
from bus.errors import BusError

MSG_ID = "Nats-Msg-Id"
ATTEMPT = "Corral-Attempt"
"""Header of a request sent again: how many times it was sent (1 the first time)."""


async def publish(
    js: JetStreamContext,
    subject: str,
    message: Message,
    *,
    msg_id: str,
    traceparent: str | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Publish ``message`` durably and wait for the stream's acknowledgement.

    Args:
        js: JetStream context.
        subject: Destination subject (from ``bus.subjects``).
        message: Any wire message.
        msg_id: Deterministic id; a republish within the duplicate window is dropped.
        traceparent: Trace context to carry; defaults to the current message's.
        timeout_s: How long to wait for the acknowledgement.

    Raises:
        BusError: if the server refuses or does not acknowledge (``retryable``).
    """
    headers = {MSG_ID: msg_id}
    trace = traceparent or current_traceparent()
    if trace:
        headers[TRACEPARENT] = trace
    try:
        await js.publish(subject, encode(message), timeout=timeout_s, headers=headers)
    except Exception as exc:
        raise BusError(f"publish to {subject} failed: {exc}", subject=subject) from exc


async def publish_live(nc: Client, subject: str, message: Message, *, traceparent: str | None = None) -> None:
    """Publish ``message`` to whoever listens now, without storing it or waiting.

    For news (progress, step events), never for state: a failure is swallowed.
    """
    trace = traceparent or current_traceparent()
    with contextlib.suppress(Exception):
        await nc.publish(subject, encode(message), headers={TRACEPARENT: trace} if trace else None)

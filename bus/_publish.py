"""Publishing wire messages to JetStream with dedup ids and trace context (requests are
``corral.bus._requests``); every message is checked against the server's ``max_payload``, headers
included, before it is sent (nats-py checks the body alone, and a message whose headers
take it over the limit makes the server close the connection)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from corral.bus import subjects
from corral.bus._config import Limits
from corral.bus._messages import (
    AgentFailed,
    AgentOutput,
    AgentReply,
    AgentWaiting,
    ConversationStart,
    CustomerMessage,
    HandoffProposed,
    Message,
    encode,
)
from corral.bus._trace import TRACEPARENT, current_traceparent
from corral.bus.errors import BusError, ConnectionClosedError, PayloadTooLargeError

logger = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
ATTEMPT = "Corral-Attempt"
"""Header of a request sent again: how many times it was sent (1 the first time)."""


def start_problem(message: ConversationStart, client: str, limits: Limits) -> str | None:
    """Why a conversation start cannot be taken (None: it can): an id outside
    ``subjects.ID_PATTERN``, text or a customer id over its limit, a NUL character
    (PostgreSQL stores none in text)."""
    for what, value in (("conversation id", message.conversation), ("client id", client)):
        try:
            subjects.check_id(value, what)
        except ValueError as exc:
            return str(exc)
    return limit_problem(
        "text", message.text, limits.customer_text_bytes, "customer_text_bytes"
    ) or limit_problem("customer id", message.customer, limits.customer_id_bytes, "customer_id_bytes")


def message_problem(message: CustomerMessage, limits: Limits) -> str | None:
    """Why a customer's message cannot be taken (None: it can): an id outside
    ``subjects.ID_PATTERN``, or text over its limit or holding a NUL character."""
    for what, value in (("conversation id", message.conversation), ("message id", message.id)):
        try:
            subjects.check_id(value, what)
        except ValueError as exc:
            return str(exc)
    return limit_problem("text", message.text, limits.customer_text_bytes, "customer_text_bytes")


MAX_TOOL_TURNS = 1000
"""The most tool calls one step's output may report (``agents.<a>.max_tool_calls``'s
bound)."""


def output_problem(message: AgentOutput, limits: Limits) -> str | None:
    """Why an agent's output cannot be taken (None: it can): a text over its limit, or a
    NUL character anywhere (PostgreSQL stores none in text)."""
    fields: list[tuple[str, str, int, str]] = [
        ("conversation id", message.conversation, 256, ""),
        ("agent", message.agent, 256, ""),
    ]
    match message:
        case AgentReply():
            fields.append(("reply", message.text, limits.reply_text_bytes, "reply_text_bytes"))
        case HandoffProposed():
            fields.append(("target", message.target, 256, ""))
            fields.append(("handoff reason", message.reason, limits.reason_bytes, "reason_bytes"))
        case AgentFailed():
            fields.append(("failure reason", message.reason, limits.reason_bytes, "reason_bytes"))
        case AgentWaiting():
            fields.append(("approval id", message.approval_id, 256, ""))
            fields.append(("tool", message.tool, 256, ""))
            fields.append(("waiting reason", message.reason, limits.reason_bytes, "reason_bytes"))
    if isinstance(message, AgentReply | HandoffProposed):
        if len(message.tools) > MAX_TOOL_TURNS:
            return f"{len(message.tools)} tool calls are more than one step makes ({MAX_TOOL_TURNS})"
        for turn in message.tools:
            fields.append(("tool call's outcome", turn.text, limits.reason_bytes, "reason_bytes"))
            fields.append(
                ("tool call's arguments", turn.arguments, limits.tool_arguments_bytes, "tool_arguments_bytes")
            )
            fields.append(("tool call's tool", turn.tool + turn.call_id, 512, ""))
    if isinstance(message, HandoffProposed) and message.payload:
        payload = msgspec.json.encode(message.payload).decode()
        fields.append(("handoff payload", payload, limits.tool_arguments_bytes, "tool_arguments_bytes"))
    for what, value, limit, setting in fields:
        why = limit_problem(what, value, limit, setting)
        if why is not None:
            return why
    return None


def limit_problem(what: str, value: str, limit: int, setting: str = "") -> str | None:
    """Why ``value`` (``what``) cannot be taken: a NUL character (PostgreSQL stores none in
    text), or more than ``limit`` bytes of UTF-8 (``limits.<setting>``); None if it can."""
    if "\x00" in value:
        return f"{what} contains a NUL character"
    if len(value) * 4 <= limit:  # UTF-8 takes at most 4 bytes a character: no need to count
        return None
    size = len(value.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    where = f"limits.{setting}" if setting else "the limit"
    return f"{what} of {size} bytes exceeds {where} ({limit})"


def clip(text: str, limit_bytes: int) -> str:
    """``text`` cut to at most ``limit_bytes`` of UTF-8, ending in ``...`` when cut (a reason
    shown to a client, a response kept in the journal)."""
    data = text.encode()
    if len(data) <= limit_bytes:
        return text
    return data[: max(limit_bytes - 3, 0)].decode(errors="ignore") + "..."


def payload_size(data: bytes, headers: Mapping[str, str] | None = None) -> int:
    """Bytes the server counts against ``max_payload``: the body and the header block
    (``NATS/1.0``, one ``key: value`` line per header, a blank line)."""
    if not headers:
        return len(data)
    block = len(b"NATS/1.0\r\n\r\n")
    for key, value in headers.items():
        block += len(key.strip().encode()) + len(value.strip().encode()) + 4
    return block + len(data)


def check_payload(nc: Client, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> None:
    """Refuse a message the server would not take.

    Raises:
        PayloadTooLargeError: body and headers together exceed ``nc.max_payload``.
    """
    size = payload_size(data, headers)
    limit = nc.max_payload
    if limit and size > limit:
        raise PayloadTooLargeError(
            f"message to {subject} is {size} bytes with its headers, over the server's"
            f" max_payload of {limit}",
            size=size,
            limit=limit,
            subject=subject,
        )


def translate(exc: Exception, what: str, subject: str) -> BusError:
    """nats-py's failure of ``what`` on ``subject`` as a ``BusError`` that says whether
    trying again may help (a size error never does; a closed connection never will)."""
    if isinstance(exc, BusError):
        return exc
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLargeError(f"{what} to {subject}: {exc}", size=0, limit=0, subject=subject)
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return ConnectionClosedError(f"{what} to {subject}: the connection is closed", subject=subject)
    return BusError(f"{what} to {subject} failed: {exc!r}", subject=subject)


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
        PayloadTooLargeError: the message with its headers is over ``max_payload``.
        BusError: if the server refuses or does not acknowledge (``retryable``).
    """
    headers = {MSG_ID: msg_id}
    trace = traceparent or current_traceparent()
    if trace:
        headers[TRACEPARENT] = trace
    data = encode(message)
    nc: Client | None = getattr(js, "_nc", None)  # the context's connection (nats-py keeps it there)
    if nc is not None:
        check_payload(nc, subject, data, headers)
    try:
        await js.publish(subject, data, timeout=timeout_s, headers=headers)
    except Exception as exc:
        raise translate(exc, "publish", subject) from exc


async def publish_live(nc: Client, subject: str, message: Message, *, traceparent: str | None = None) -> None:
    """Publish ``message`` to whoever listens now, without storing it or waiting.

    For news (progress, step events), never for state: a failure is swallowed, and a
    message too big to send is not sent.
    """
    trace = traceparent or current_traceparent()
    headers = {TRACEPARENT: trace} if trace else None
    data = encode(message)
    try:
        check_payload(nc, subject, data, headers)
    except PayloadTooLargeError as exc:
        logger.debug("not sent: %s", exc)
        return
    with contextlib.suppress(Exception):
        await nc.publish(subject, data, headers=headers)

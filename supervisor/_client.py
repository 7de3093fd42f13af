"""The client side: start a conversation and wait for its outcome."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import msgspec

from bus import (
    Bus,
    ClientUpdate,
    ConversationEnded,
    ConversationStart,
    new_traceparent,
    publish,
    subjects,
)

_decoder = msgspec.json.Decoder(ClientUpdate)


def new_conversation_id() -> str:
    """A fresh conversation id, usable as a subject token."""
    return f"c-{uuid.uuid4().hex[:20]}"


async def start_conversation(
    bus: Bus,
    text: str,
    *,
    customer: str = "",
    conversation: str | None = None,
    client: str = subjects.DEFAULT_CLIENT,
) -> str:
    """Publish a conversation start as ``client`` and return its id (without waiting)."""
    conversation = conversation or new_conversation_id()
    await publish(
        bus.js,
        subjects.conversation_start(client, conversation),
        ConversationStart(conversation=conversation, text=text, customer=customer),
        msg_id=conversation,
        traceparent=new_traceparent(),
    )
    return conversation


async def send_and_wait(
    bus: Bus,
    text: str,
    *,
    customer: str = "",
    timeout_s: float = 30.0,
    conversation: str | None = None,
    on_update: Callable[[ClientUpdate], None] | None = None,
    client: str = subjects.DEFAULT_CLIENT,
) -> ConversationEnded:
    """Start a conversation and wait for it to end.

    The subscription to the conversation's updates is in place before the start is
    published, so no update can be missed.

    Raises:
        TimeoutError: if the conversation has not ended within ``timeout_s``.
    """
    conversation = conversation or new_conversation_id()
    ended: asyncio.Future[ConversationEnded] = asyncio.get_running_loop().create_future()

    async def _on_message(msg: object) -> None:
        try:
            update = _decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            return
        if on_update is not None:
            on_update(update)
        if isinstance(update, ConversationEnded) and not ended.done():
            ended.set_result(update)

    sub = await bus.nc.subscribe(subjects.conversation_updates(client, conversation), cb=_on_message)
    try:
        await bus.nc.flush()
        await start_conversation(bus, text, customer=customer, conversation=conversation, client=client)
        return await asyncio.wait_for(ended, timeout_s)
    finally:
        await sub.unsubscribe()


def format_path(ended: ConversationEnded) -> str:
    """``triage -> payments (0.93) -> account_manager (0.91)``."""
    parts = []
    for hop in ended.path:
        parts.append(hop.agent if hop.confidence is None else f"{hop.agent} ({hop.confidence:.2f})")
    return " -> ".join(parts)

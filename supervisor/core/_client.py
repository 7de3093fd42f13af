"""The client side: start a conversation and wait for its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import msgspec

from corral.bus import (
    DECODE_ERRORS,
    Bus,
    ClientUpdate,
    ConversationAwaiting,
    ConversationEnded,
    ConversationStart,
    ConversationWaiting,
    CustomerMessage,
    Hop,
    MessageRefused,
    publish,
    server_has_seen,
    spans,
    subjects,
)

_decoder = msgspec.json.Decoder(ClientUpdate)

Settled = ConversationEnded | ConversationWaiting | ConversationAwaiting | MessageRefused
"""Where a conversation stops for someone outside: it ended, waits for an approval, awaits
the customer's next message, or the customer's message was refused."""

_SETTLED = (ConversationEnded, ConversationWaiting, ConversationAwaiting, MessageRefused)


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
    dry_run: bool = False,
) -> str:
    """Publish a conversation start as ``client`` and return its id (without waiting)."""
    conversation = conversation or new_conversation_id()
    with spans.turn(conversation, event="start", client=client, dry_run=dry_run):
        await publish(
            bus.js,
            subjects.conversation_start(client, conversation),
            ConversationStart(conversation=conversation, text=text, customer=customer, dry_run=dry_run),
            msg_id=conversation,
            traceparent=spans.traceparent(conversation),
        )
    return conversation


async def send_message(
    bus: Bus,
    conversation: str,
    text: str,
    *,
    client: str = subjects.DEFAULT_CLIENT,
    message_id: str | None = None,
) -> str:
    """Publish the customer's next message in ``conversation`` as ``client`` (without
    waiting); returns the message's id (the same id sent again is one turn)."""
    message_id = message_id or f"m-{uuid.uuid4().hex[:20]}"
    with spans.turn(conversation, event="message", client=client):
        await publish(
            bus.js,
            subjects.conversation_start(client, conversation),
            CustomerMessage(conversation=conversation, text=text, id=message_id),
            msg_id=f"{conversation}.m.{message_id}",
            traceparent=spans.traceparent(conversation),
        )
    return message_id


async def message_until_settled(
    bus: Bus,
    conversation: str,
    text: str,
    *,
    timeout_s: float = 30.0,
    on_update: Callable[[ClientUpdate], None] | None = None,
    client: str = subjects.DEFAULT_CLIENT,
    message_id: str | None = None,
) -> Settled:
    """Send the customer's next message and wait until the conversation settles again
    (``Settled``).

    Raises:
        TimeoutError: if it did not within ``timeout_s``.
    """

    async def begin() -> None:
        await send_message(bus, conversation, text, client=client, message_id=message_id)

    update = await _settle(bus, conversation, begin, timeout_s, on_update, client, _SETTLED)
    assert isinstance(update, Settled)
    return update


async def send_and_wait(
    bus: Bus,
    text: str,
    *,
    customer: str = "",
    timeout_s: float = 30.0,
    conversation: str | None = None,
    on_update: Callable[[ClientUpdate], None] | None = None,
    client: str = subjects.DEFAULT_CLIENT,
    dry_run: bool = False,
) -> ConversationEnded:
    """Start a conversation and wait for it to end.

    Raises:
        TimeoutError: if the conversation has not ended within ``timeout_s``.
    """
    update = await _follow(
        bus, text, customer, timeout_s, conversation, on_update, client, dry_run, settled=(ConversationEnded,)
    )
    assert isinstance(update, ConversationEnded)
    return update


async def send_until_settled(
    bus: Bus,
    text: str,
    *,
    customer: str = "",
    timeout_s: float = 30.0,
    on_update: Callable[[ClientUpdate], None] | None = None,
    client: str = subjects.DEFAULT_CLIENT,
    dry_run: bool = False,
) -> Settled:
    """Start a conversation and wait until it settles (``Settled``).

    Raises:
        TimeoutError: if it did not within ``timeout_s``.
    """
    update = await _follow(bus, text, customer, timeout_s, None, on_update, client, dry_run, settled=_SETTLED)
    assert isinstance(update, Settled)
    return update


async def _follow(
    bus: Bus,
    text: str,
    customer: str,
    timeout_s: float,
    conversation: str | None,
    on_update: Callable[[ClientUpdate], None] | None,
    client: str,
    dry_run: bool,
    *,
    settled: tuple[type[ClientUpdate], ...],
) -> ClientUpdate:
    """Start a conversation and return its first update of a ``settled`` kind.

    The subscription to the conversation's updates is in place before the start is
    published, so no update can be missed.
    """
    conversation = conversation or new_conversation_id()
    started = conversation

    async def begin() -> None:
        await start_conversation(
            bus, text, customer=customer, conversation=started, client=client, dry_run=dry_run
        )

    return await _settle(bus, conversation, begin, timeout_s, on_update, client, settled)


async def _settle(
    bus: Bus,
    conversation: str,
    begin: Callable[[], Awaitable[None]],
    timeout_s: float,
    on_update: Callable[[ClientUpdate], None] | None,
    client: str,
    settled: tuple[type[ClientUpdate], ...],
) -> ClientUpdate:
    """Watch ``conversation``, run ``begin`` (a publish), and return the first ``settled``
    update: the watch is in place first, so nothing ``begin`` causes can be missed."""
    async with watching(bus, conversation, settled=settled, client=client, on_update=on_update) as done:
        await begin()
        return await asyncio.wait_for(done, timeout_s)


@contextlib.asynccontextmanager
async def watching(
    bus: Bus,
    conversation: str,
    *,
    settled: tuple[type[ClientUpdate], ...] = (ConversationEnded,),
    client: str = subjects.DEFAULT_CLIENT,
    on_update: Callable[[ClientUpdate], None] | None = None,
) -> AsyncIterator[asyncio.Future[ClientUpdate]]:
    """Watch a conversation's updates; the future resolves with the first ``settled`` one.

    The subscription is in place (flushed) when the block starts, so whatever the block
    causes next (a start, an approval) cannot be missed.
    """
    done: asyncio.Future[ClientUpdate] = asyncio.get_running_loop().create_future()

    async def _on_message(msg: object) -> None:
        try:
            update = _decoder.decode(msg.data)  # type: ignore[attr-defined]
        except DECODE_ERRORS:
            return
        if on_update is not None:
            on_update(update)
        if isinstance(update, settled) and not done.done():
            done.set_result(update)

    subs = [
        await bus.nc.subscribe(subject, cb=_on_message)
        for subject in (
            subjects.conversation_updates(client, conversation),
            subjects.conversation_progress(client, conversation),
        )
    ]
    try:
        await server_has_seen(bus.nc)  # no update of the conversation can pass unseen
        yield done
    finally:
        for sub in subs:
            await sub.unsubscribe()


def format_path(ended: ConversationEnded) -> str:
    """``triage -> payments (0.93) -> account_manager (0.91)``."""
    return format_hops(ended.path)


def format_hops(hops: Iterable[Hop]) -> str:
    """A path's hops as ``triage -> payments (0.93)``: each agent, with the confidence of the
    handoff that reached it."""
    return " -> ".join(h.agent if h.confidence is None else f"{h.agent} ({h.confidence:.2f})" for h in hops)

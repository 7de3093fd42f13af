"""A conversation's events, as Server-Sent Events: its stored updates from JetStream, each
with its stream sequence as the event's id, and its live progress beside them.

Stored updates (tool decisions' outcomes, a question to the customer, waiting for an
approval, a refusal, the end) are in ``CORRAL_EVENTS``: a client that reconnects with
``Last-Event-ID`` gets every stored update after that id, and none twice. Progress
(handoffs forwarded, tool decisions) is live only, as it is for every client: it has no
id, and a client that was away misses it (the conversation's record has every step).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from corral.bus import Bus, ClientUpdate, ConversationEnded, subjects

_decoder = msgspec.json.Decoder(ClientUpdate)
_encoder = msgspec.json.Encoder()

FINAL = frozenset({"replied", "refused", "failed", "killed", "closed"})
"""Statuses after which a conversation has nothing more to say (an escalation may go on)."""

_BUFFER = 1000
"""Events held for a slow reader before the stream gives up on it."""


def _kind(update: ClientUpdate) -> str:
    return str(type(update).__struct_config__.tag)


async def conversation_events(
    bus: Bus, client: str, conversation: str, after: int | None
) -> AsyncIterator[dict[str, Any]]:
    """The conversation's events (``sse-starlette`` dicts), from the stored update after
    sequence ``after`` (None: from its first), until it ends or the reader goes away."""
    queue: asyncio.Queue[tuple[int | None, ClientUpdate] | None] = asyncio.Queue(_BUFFER)

    def put(item: tuple[int | None, ClientUpdate] | None) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            queue.put_nowait(None)  # too slow a reader: end its stream; it resumes by id

    async def stored(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            put((msg.metadata.sequence.stream, _decoder.decode(msg.data)))

    async def live(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            put((None, _decoder.decode(msg.data)))

    config = (
        ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if after is None
        else ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
    )
    progress = await bus.nc.subscribe(subjects.conversation_progress(client, conversation), cb=live)
    updates = await bus.js.subscribe(
        subjects.conversation_updates(client, conversation),
        cb=stored,
        stream=subjects.EVENTS_STREAM,
        ordered_consumer=True,
        config=config,
    )
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            sequence, update = item
            event: dict[str, Any] = {"event": _kind(update), "data": _encoder.encode(update).decode()}
            if sequence is not None:
                event["id"] = str(sequence)
            yield event
            if sequence is not None and isinstance(update, ConversationEnded) and update.status in FINAL:
                return
    finally:
        for sub in (updates, progress):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

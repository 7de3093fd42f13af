"""Closing conversations whose customer went quiet: those that awaited the customer's next
message longer than ``conversation.idle_timeout_s`` are closed, with the reason."""

from __future__ import annotations

import asyncio
import logging

from corral.supervisor.core import _dialogue
from corral.supervisor.core._graph import Act
from corral.supervisor.store._store import Store

logger = logging.getLogger(__name__)


class IdleCloser:
    """Close idle conversations, now (``close_idle``) or every so often (``run``).

    Args:
        store: Where the conversations are.
        apply: How a decision on one is made, saved and published.
        idle_timeout_s: How long a conversation may await its customer.
    """

    def __init__(self, store: Store, apply: Act, idle_timeout_s: float) -> None:
        self._store = store
        self._apply = apply
        self._timeout = idle_timeout_s

    async def close_idle(self) -> int:
        """Close the conversations idle past the timeout; how many there were."""
        timeout = self._timeout
        conversations = await self._store.awaiting_since(timeout)
        for conversation in conversations:
            # Decided on the conversation as it is now: one the customer just answered stays open.
            await self._apply(conversation, lambda record: _dialogue.idle(record, timeout))
        return len(conversations)

    async def run(self) -> None:
        """Close idle conversations at a quarter of the timeout (at least every 30 s), until
        cancelled."""
        interval = min(self._timeout / 4, 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.close_idle()
            except Exception:
                logger.exception("could not close idle conversations; trying again in %.0f s", interval)

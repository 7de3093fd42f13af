"""A service on core NATS subjects: each message handled in its own task, all of them
finished (or given a grace period) on shutdown. The tool gateway, the journal and the
advisory watcher and the supervisor's output desk are such services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg

logger = logging.getLogger(__name__)


class Serving(Protocol):
    """Anything served until ``shutdown()``: a consumer, a message service, the supervisor,
    the gateway; what ``serve_together``, ``serve_with_control`` and the CLI run."""

    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...


async def serve_together(*services: Serving) -> None:
    """Run ``services``; when any of them stops, stop them all, and raise what it raised
    (e.g. ``ConnectionClosedError`` from a ``ConnectionGuard``)."""
    tasks = [asyncio.create_task(service.run(), name=type(service).__name__) for service in services]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for service in services:
            await service.shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)


class MessageService(ABC):
    """Serve ``subject`` (in ``queue``, if given, so replicas share the work).

    Args:
        nc: The NATS connection.
        subject: What to subscribe to (one subject or several).
        queue: A queue group, or "" for every instance to see every message.
        grace_s: How long in-flight messages may take on shutdown.
        max_in_flight: Messages handled at once (None: no limit); the rest wait in the
            subscription's queue, so a busy service does not take on more than it can do.
    """

    def __init__(
        self,
        nc: Client,
        subject: str | Sequence[str],
        queue: str = "",
        grace_s: float = 10.0,
        max_in_flight: int | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = [subject] if isinstance(subject, str) else list(subject)
        self._queue = queue
        self._grace_s = grace_s
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def run(self) -> None:
        """Serve until ``shutdown()``; in-flight messages get the grace period."""
        subs = [await self._nc.subscribe(s, queue=self._queue, cb=self._dispatch) for s in self._subjects]
        try:
            await self._stopping.wait()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self._grace_s)

    async def shutdown(self) -> None:
        """Stop serving; idempotent."""
        self._stopping.set()

    async def _dispatch(self, msg: Msg) -> None:
        if self._slots is not None:
            await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._slots is not None:
            self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        # The boundary: whatever a handler lets escape is logged here, never lost in a
        # task nobody awaits; cancellation (shutdown) passes.
        try:
            await self.on_message(msg)
        except Exception:
            logger.exception("%s failed on a message from %s", type(self).__name__, msg.subject)

    @abstractmethod
    async def on_message(self, msg: Msg) -> None:
        """Handle one message (failures are the handler's to report)."""

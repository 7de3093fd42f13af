"""The one lifecycle shape of everything long-running, and a service on core NATS subjects.

``Service``: ``run()`` serves until ``shutdown()``; ``shutdown()`` returns once ``run()`` has
returned (in-flight work finished, or cancelled past its grace period); ``async with`` runs
the service in a task and shuts it down on exit. ``MessageService`` handles each message of
its subjects in its own task; the tool gateway, the journal, the advisory watcher and the
supervisor's output desk are such services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

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
        # All told at once: each shutdown waits for its service, and their grace periods
        # overlap instead of adding up.
        await asyncio.gather(*(service.shutdown() for service in services), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)


async def finish_in_flight(tasks: Collection[asyncio.Task[Any]], grace_s: float) -> None:
    """Give ``tasks`` ``grace_s`` to finish, then cancel the rest and wait for them."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class Service(ABC):
    """``run()`` until ``shutdown()``, and ``async with``: the lifecycle every long-running
    thing shares (consumers, message and request services, the kill-switch watcher, the
    supervisor, the agent).

    Subclasses implement ``_serve()``, which returns once ``self._stopping`` is set and its
    in-flight work has ended, and set ``self._started`` once they serve (subscribed, bound),
    so that ``async with`` returns when requests can be answered.
    """

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running: asyncio.Task[Any] | None = None
        """The task inside ``run()`` while it runs."""
        self._entered: asyncio.Task[None] | None = None
        """The task ``async with`` runs the service in."""

    async def run(self) -> None:
        """Serve until ``shutdown()``; a service shut down before ``run()`` does not start.

        Raises:
            RuntimeError: if it is running already.
        """
        if self._running is not None:
            raise RuntimeError(f"{type(self).__name__} is running already")
        self._running = asyncio.current_task()
        self._stopped.clear()
        try:
            if not self._stopping.is_set():
                await self._serve()
        finally:
            self._running = None
            self._started.set()  # nobody waits for a start that will not come
            self._stopped.set()

    async def shutdown(self) -> None:
        """Stop serving, and return once ``run()`` has returned; idempotent, and safe before
        ``run()`` (which then returns at once). Called from inside the service's own work
        (its run or a handler's task), it does not wait for itself."""
        self._stopping.set()
        if self._running is None or self._is_own_task(asyncio.current_task()):
            return
        await self._stopped.wait()

    async def wait_started(self) -> None:
        """Wait until the service serves (or has stopped: then at once)."""
        await self._started.wait()

    async def _started_with(self, *parts: Service) -> None:
        """Mark this service started once all of ``parts`` (the services it is made of) are:
        for a composite's ``_serve()``, run beside its parts."""
        await asyncio.gather(*(part.wait_started() for part in parts))
        self._started.set()

    async def __aenter__(self) -> Self:
        """Run the service in a task; return once it serves (or has already stopped).

        Raises:
            Exception: what ``run()`` raised if it ended before serving.
        """
        task = asyncio.create_task(self.run(), name=type(self).__name__)
        self._entered = task
        started = asyncio.create_task(self._started.wait())
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        if task.done():
            self._entered = None
            task.result()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Shut the service down and wait for it; raise what ``run()`` raised, unless the
        block itself is raising."""
        await self.shutdown()
        task, self._entered = self._entered, None
        if task is None:
            return
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception):
            if exc is None:
                raise outcome
            logger.warning("%s failed while stopping: %s", type(self).__name__, outcome)

    def _is_own_task(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether ``task`` is this service's own work (its ``run()``; subclasses add their
        in-flight tasks), which ``shutdown()`` must not wait for."""
        return task is not None and task is self._running

    @abstractmethod
    async def _serve(self) -> None:
        """Serve until ``self._stopping`` is set; set ``self._started`` once serving."""


async def server_has_seen(nc: Client) -> None:
    """Return once the server has processed every command sent on ``nc`` so far (its
    subscriptions above all: a request sent after this finds them).

    ``nc.flush()`` alone is not that: nats-py writes its PING straight to the socket, ahead
    of commands still queued for its flusher task, so the PONG can come back before the
    server has seen a SUB sent just before (measured: 23 "no responders" in 300 requests
    right after a subscribe and one flush; none after two). By the second PING, the flusher,
    woken before the first, has written them, and the server answers PINGs in order.
    """
    await nc.flush()
    await nc.flush()


class MessageService(Service):
    """Serve ``subject`` (in ``queue``, if given, so replicas share the work).

    Args:
        nc: The NATS connection.
        subject: What to subscribe to (one subject or several).
        queue: A queue group, or "" for every instance to see every message.
        grace_s: How long in-flight messages may take on shutdown; then they are cancelled.
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
        super().__init__()
        self._nc = nc
        self._subjects = [subject] if isinstance(subject, str) else list(subject)
        self._queue = queue
        self._grace_s = grace_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def _serve(self) -> None:
        """Serve until ``shutdown()``; in-flight messages get the grace period."""
        subs = []
        try:
            for subject in self._subjects:
                subs.append(await self._nc.subscribe(subject, queue=self._queue, cb=self._dispatch))
            await server_has_seen(self._nc)  # started means the server routes requests here
            self._started.set()
            await self._stopping.wait()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if subs:
                with contextlib.suppress(Exception):  # stopped means the server routes nothing here
                    await server_has_seen(self._nc)
            await finish_in_flight(self._tasks, self._grace_s)

    def _is_own_task(self, task: asyncio.Task[Any] | None) -> bool:
        return super()._is_own_task(task) or task in self._tasks

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

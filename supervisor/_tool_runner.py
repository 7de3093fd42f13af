"""Run tool bodies off the gateway's event loop, bounded in time, inside the call's transaction.

A tool's ``resource()`` and ``run()`` are user code: one may await something slow, or spin
the CPU. Each runs in a worker thread with its own event loop, so the gateway's loop goes
on serving other calls; its ``ctx.conn`` is a ``ToolConnection`` whose statements are
marshalled to the gateway's loop (``asyncio.run_coroutine_threadsafe``) and run on the
call's own connection, in the call's one transaction. Past its deadline a body is
abandoned: its connection refuses further statements, the statement in flight is
cancelled, and the caller rolls back what the tool did.

A thread cannot stop a body that never yields the interpreter lock: a single C-level
operation such as ``9**9**9`` holds it until it finishes, and stalls every thread. Only a
separate process could bound that; pure-Python loops and awaits are bounded here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from agents._tools import ToolInput
from bus.errors import CorralError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Statements that would leave the tools' role for the gateway's own (SET LOCAL ROLE is
# undone by any of these). Defence in depth for a tool that runs SQL it was given; a tool
# module itself is trusted code in the gateway's process.
_ROLE_CHANGE = re.compile(
    r"\b(reset\s+(role|all|session)\b|set\s+(local\s+|session\s+)?(role|session\s+authorization)\b"
    r"|session_authorization\b|set_config\s*\(|discard\s+all\b)",
    re.IGNORECASE,
)


class ToolTimeoutError(CorralError):
    """A tool body ran past its deadline; what it did is rolled back."""

    def __init__(self, tool: str, seconds: float) -> None:
        super().__init__(f"tool {tool} timed out after {seconds:g}s; nothing it did was kept")
        self.tool = tool
        self.seconds = seconds
        self.retryable = False


class ToolStatementError(CorralError):
    """A tool's statement was refused (a role change, or its connection was closed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retryable = False


class ToolConnection:
    """The call's connection as a tool body sees it from its worker thread.

    Only ``fetch``, ``fetchrow``, ``fetchval``, ``execute`` and ``executemany``; each runs on
    the gateway's loop, on the call's connection. After ``close()`` every statement fails.
    """

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._closed: str | None = None
        self._running: set[asyncio.Task[Any]] = set()  # touched on the gateway's loop only

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._marshal("fetch", query, args)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._marshal("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any, column: int = 0) -> Any:
        return await self._marshal("fetchval", query, args, column=column)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._marshal("execute", query, args)  # type: ignore[no-any-return]

    async def executemany(self, command: str, args: Any) -> None:
        await self._marshal("executemany", command, (args,))

    async def _marshal(self, method: str, query: str, args: tuple[Any, ...], **kwargs: Any) -> Any:
        if _ROLE_CHANGE.search(query):
            raise ToolStatementError(f"a tool may not change its database role: {query[:80]!r}")
        future = asyncio.run_coroutine_threadsafe(self._run(method, query, args, kwargs), self._loop)
        return await asyncio.wrap_future(future)

    async def _run(self, method: str, query: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # On the gateway's loop: serialized with close(), so nothing starts after it.
        if self._closed is not None:
            raise ToolStatementError(self._closed)
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            return await getattr(self._conn, method)(query, *args, **kwargs)
        finally:
            self._running.discard(task)

    async def close(self, reason: str) -> None:
        """Refuse every further statement and cancel the one in flight (on the gateway's loop)."""
        self._closed = reason
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


class _Worker:
    """A thread running an event loop of its own."""

    def __init__(self, number: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"corral-tool-{number}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self) -> None:
        """Stop the loop once whatever runs on it yields (never, for a body stuck for good)."""
        self.loop.call_soon_threadsafe(self.loop.stop)


class ToolRunner:
    """Run tool bodies in worker threads, each bounded by a deadline.

    Args:
        max_idle: Idle workers kept for the next calls (more are started when needed).
    """

    def __init__(self, *, max_idle: int = 16) -> None:
        self._idle: list[_Worker] = []
        self._max_idle = max_idle
        self._started = 0

    async def run(
        self,
        tool: str,
        body: Callable[[ToolInput[Any]], Awaitable[T]],
        ctx: ToolInput[Any],
        timeout_s: float,
    ) -> T:
        """``body(ctx)`` in a worker, its statements on ``ctx.conn``; at most ``timeout_s``.

        Raises:
            ToolTimeoutError: past the deadline (the caller rolls back what the tool did).
            Exception: whatever the body raised.
        """
        loop = asyncio.get_running_loop()
        proxy = ToolConnection(ctx.conn, loop)
        worker = self._idle.pop() if self._idle else self._start()
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            _call(body, dataclasses.replace(ctx, conn=proxy)), worker.loop
        )
        wrapped = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({wrapped}, timeout=max(timeout_s, 0.0))
        except asyncio.CancelledError:
            await self._abandon(tool, future, proxy, worker)
            raise
        if not done:
            logger.warning("tool %s timed out after %ss", tool, timeout_s)
            await self._abandon(tool, future, proxy, worker)
            raise ToolTimeoutError(tool, timeout_s)
        if len(self._idle) < self._max_idle:
            self._idle.append(worker)
        else:
            worker.stop()
        return wrapped.result()  # the body's own exception, if it raised

    @staticmethod
    async def _abandon(
        tool: str, future: concurrent.futures.Future[Any], proxy: ToolConnection, worker: _Worker
    ) -> None:
        # Timed out, or the gateway is stopping: nothing more of this body may reach the
        # connection. A body stuck in the CPU keeps its thread; the worker is not reused.
        future.cancel()
        await proxy.close(f"tool {tool} was abandoned past its deadline; its connection is closed")
        worker.stop()

    def _start(self) -> _Worker:
        self._started += 1
        return _Worker(self._started)

    def close(self) -> None:
        """Stop the idle workers."""
        while self._idle:
            self._idle.pop().stop()


async def _call(body: Callable[[ToolInput[Any]], Awaitable[T]], ctx: ToolInput[Any]) -> T:
    return await body(ctx)

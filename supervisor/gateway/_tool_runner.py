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
separate process can bound that: a tool declaring ``isolation = "process"`` is wrapped in a
``supervisor.gateway._tool_process.ProcessTool``, whose bodies run in a child process killed at the
deadline, and the wrapper runs here on the calling loop. Pure-Python loops and awaits are
bounded here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, TypeVar

import asyncpg

from corral.bus.errors import CorralError
from corral.supervisor.gateway._tools import ToolInput

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


_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
"""SQL comments, which would otherwise hide a role change from ``_ROLE_CHANGE``
(``SET/**/ROLE``); quoted identifiers are unquoted too (``"set_config"(...)``)."""


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


class Statements(ABC):
    """What a tool body's ``ctx.conn`` offers: asyncpg's statement methods, each handed to
    ``_statement`` (which runs it on the call's connection, wherever the body runs)."""

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._statement("fetch", query, args)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._statement("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any, column: int = 0) -> Any:
        return await self._statement("fetchval", query, args, column=column)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._statement("execute", query, args)  # type: ignore[no-any-return]

    async def executemany(self, command: str, args: Any) -> None:
        await self._statement("executemany", command, (args,))

    @abstractmethod
    async def _statement(self, method: str, query: str, args: tuple[Any, ...], **kwargs: Any) -> Any:
        """Run ``method(query, *args, **kwargs)`` on the call's connection."""


class ToolConnection(Statements):
    """The call's connection as a tool body sees it from its worker thread.

    Only ``fetch``, ``fetchrow``, ``fetchval``, ``execute`` and ``executemany``; each runs on
    the gateway's loop, on the call's connection. After ``close()`` every statement fails.
    """

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop | None) -> None:
        self._conn = conn
        self._loop = loop  # None: the body runs on the gateway's loop itself
        self._closed: str | None = None
        self._running: set[asyncio.Task[Any]] = set()  # touched on the gateway's loop only

    async def _statement(self, method: str, query: str, args: tuple[Any, ...], **kwargs: Any) -> Any:
        if _ROLE_CHANGE.search(_COMMENTS.sub(" ", query).replace('"', "")):
            raise ToolStatementError(f"a tool may not change its database role: {query[:80]!r}")

        if self._loop is None:
            if self._closed is not None:
                raise ToolStatementError(self._closed)
            return await getattr(self._conn, method)(query, *args, **kwargs)

        def statement() -> Awaitable[Any]:
            # On the gateway's loop: serialized with close(), so nothing starts after it.
            if self._closed is not None:
                raise ToolStatementError(self._closed)
            return getattr(self._conn, method)(query, *args, **kwargs)  # type: ignore[no-any-return]

        return await _hand_over(self._loop, statement, self._running).result

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
        *,
        isolation: Literal["loop", "thread", "process"] = "thread",
    ) -> T:
        """``body(ctx)`` in a worker thread, its statements on ``ctx.conn``; at most ``timeout_s``.
        ``"loop"``: on the calling loop, bounded only in what it awaits.

        Raises:
            ToolTimeoutError: past the deadline (the caller rolls back what the tool did).
            ValueError: ``"process"``: ``body`` is a closure, which cannot cross to another
                process; wrap the tool in ``ProcessTool`` and run the wrapper on the loop.
            Exception: whatever the body raised.
        """
        if isolation == "loop":
            return await self._run_inline(tool, body, ctx, timeout_s)
        if isolation == "process":
            raise ValueError(
                f"tool {tool} declares isolation 'process': run it wrapped in"
                " supervisor.gateway._tool_process.ProcessTool, with isolation 'loop'"
            )
        loop = asyncio.get_running_loop()
        proxy = ToolConnection(ctx.conn, loop)
        worker = self._idle.pop() if self._idle else self._start()
        handed = _hand_over(worker.loop, lambda: body(dataclasses.replace(ctx, conn=proxy)))
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)) as deadline:
                result = await handed.result
        except asyncio.CancelledError:
            await self._abandon(tool, handed, proxy, worker)
            raise
        except TimeoutError:
            if not deadline.expired():
                raise  # the body's own TimeoutError
            logger.warning("tool %s timed out after %ss", tool, timeout_s)
            await self._abandon(tool, handed, proxy, worker)
            raise ToolTimeoutError(tool, timeout_s) from None
        except BaseException:
            self._release(worker)
            raise  # the body's own exception
        self._release(worker)
        return result

    @staticmethod
    async def _run_inline(
        tool: str, body: Callable[[ToolInput[Any]], Awaitable[T]], ctx: ToolInput[Any], timeout_s: float
    ) -> T:
        # On the gateway's loop: what the body awaits is bounded (a statement in flight is
        # cancelled), what it computes is not.
        proxy = ToolConnection(ctx.conn, None)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)) as deadline:
                return await body(dataclasses.replace(ctx, conn=proxy))
        except TimeoutError:
            if not deadline.expired():
                raise
            logger.warning("tool %s timed out after %ss", tool, timeout_s)
            raise ToolTimeoutError(tool, timeout_s) from None
        finally:
            proxy._closed = f"tool {tool} has returned; its connection is closed"

    def _release(self, worker: _Worker) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(worker)
        else:
            worker.stop()

    @staticmethod
    async def _abandon(tool: str, handed: _Handed[Any], proxy: ToolConnection, worker: _Worker) -> None:
        # Timed out, or the gateway is stopping: nothing more of this body may reach the
        # connection. A body stuck in the CPU keeps its thread; the worker is not reused.
        handed.cancel()
        await proxy.close(f"tool {tool} was abandoned past its deadline; its connection is closed")
        worker.stop()

    def _start(self) -> _Worker:
        self._started += 1
        return _Worker(self._started)

    def close(self) -> None:
        """Stop the idle workers."""
        while self._idle:
            self._idle.pop().stop()


class _Handed(Generic[T]):
    """Work handed to another thread's loop: its result as a future of the caller's loop."""

    def __init__(self, there: asyncio.AbstractEventLoop) -> None:
        self.here = asyncio.get_running_loop()
        self.there = there
        self.result: asyncio.Future[T] = self.here.create_future()
        self.task: asyncio.Task[T] | None = None  # on ``there``
        self.cancelled = False

    def cancel(self) -> None:
        """Cancel the work on its loop (from the caller's loop)."""
        self.cancelled = True
        self.there.call_soon_threadsafe(self._cancel_there)

    def _cancel_there(self) -> None:
        if self.task is not None:
            self.task.cancel()


def _hand_over(
    there: asyncio.AbstractEventLoop,
    start: Callable[[], Awaitable[T]],
    running: set[asyncio.Task[Any]] | None = None,
) -> _Handed[T]:
    """Run ``start()``'s awaitable as a task on ``there`` (another thread's loop); its outcome
    settles ``.result`` on the calling loop. One wake-up each way, no concurrent.futures: the
    hot path of every tool statement. ``running`` (touched on ``there`` only) holds the task
    while it runs."""
    handed: _Handed[T] = _Handed(there)

    def settle(outcome: asyncio.Task[T] | BaseException) -> None:  # on the caller's loop
        if handed.result.done():
            return
        if isinstance(outcome, BaseException):
            handed.result.set_exception(outcome)
        elif outcome.cancelled():
            handed.result.cancel()
        elif (exc := outcome.exception()) is not None:
            handed.result.set_exception(exc)
        else:
            handed.result.set_result(outcome.result())

    def finished(task: asyncio.Task[T]) -> None:  # on ``there``
        if running is not None:
            running.discard(task)
        handed.here.call_soon_threadsafe(settle, task)

    def begin() -> None:  # on ``there``
        if handed.cancelled:
            handed.here.call_soon_threadsafe(settle, asyncio.CancelledError())
            return
        try:
            awaitable = start()
        except BaseException as exc:
            handed.here.call_soon_threadsafe(settle, exc)
            return
        task = asyncio.ensure_future(awaitable)
        handed.task = task
        if running is not None:
            running.add(task)
        task.add_done_callback(finished)

    there.call_soon_threadsafe(begin)
    return handed

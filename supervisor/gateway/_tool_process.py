"""Tool bodies in a child process, killed at the deadline: the one bound on a body that never
yields the interpreter lock (a single C-level operation such as ``9**9**9``).

``ProcessTool`` wraps a tool, with its interface, and runs its ``resource()`` and ``run()`` in
a child Python process (``python -m corral.supervisor.gateway._tool_worker``, which also defines the wire);
the wrapper itself runs on the caller's loop. A child gets the parent's ``sys.path`` and the
pickled tool once, then per call the method and the ``ToolInput`` without ``conn``. Each
statement of the body comes back here and runs on the call's ``ctx.conn`` (the gateway's
``ToolConnection``: its role checks apply, in the call's transaction); its result (records
as ``Row``) or exception goes back; then the body's value or exception comes here.

A call holds a child of its own. Cancelled (its deadline, or the gateway stopping), it kills
the child (SIGKILL) and waits for it; the next call gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pickle
import sys
from typing import Any

import asyncpg

from corral.supervisor.config._tools_module import file_of
from corral.supervisor.gateway._tool_worker import (
    STATEMENTS,
    Row,
    ToolProcessError,
    decode_error,
    encode_error,
    frame,
    receive,
)
from corral.supervisor.gateway._tools import Resource, Tool, ToolInput

__all__ = ["ProcessTool", "Row", "ToolProcessError"]

logger = logging.getLogger(__name__)

_DECLARED = (
    "name",
    "description",
    "arguments",
    "changes_state",
    "undo",
    "resource_fields",
    "resource_type",
    "fact_types",
    "groups",
    "needs_customer",
)


class ProcessTool(Tool[Any]):
    """``tool`` with its ``resource()`` and ``run()`` in child processes, one call at a time
    per child; everything else is the tool's own (``isolation`` aside: the wrapper runs on
    the caller's loop). Start with ``start()`` (optional: a call starts a child if none is
    idle), stop with ``close()``.

    Args:
        tool: The tool; its instance, its class and its arguments model must pickle.
        max_idle: Idle children kept for the next calls (more are started when needed).
        spawn_timeout_s: How long a new child may take to load the tool.

    Raises:
        ToolProcessError: ``tool`` does not pickle, or its class is defined in ``__main__``.
    """

    isolation = "loop"

    def __init__(self, tool: Tool[Any], *, max_idle: int = 2, spawn_timeout_s: float = 30.0) -> None:
        self.tool = tool
        # The tool's declarations, its class variables (the type checker allows no
        # assignment to a class variable through an instance).
        vars(self).update({name: getattr(tool, name) for name in _DECLARED})
        self._pickled = _pickle_tool(tool)
        # Tools files (``tools: {path: …}``) the child loads by path before the tool unpickles.
        self._files = sorted(
            {file for cls in (*type(tool).__mro__, tool.arguments) if (file := file_of(cls.__module__))}
        )
        self._max_idle = max_idle
        self._spawn_timeout_s = spawn_timeout_s
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()  # idle and in flight
        self._warming: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def irreversible(self) -> bool:
        return self.tool.irreversible

    def undo_arguments(self, arguments: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        return self.tool.undo_arguments(arguments, result)

    def resource_key(self, arguments: dict[str, Any]) -> str:
        return self.tool.resource_key(arguments)

    def schema(self) -> dict[str, Any]:
        return self.tool.schema()

    async def resource(self, call: ToolInput[Any]) -> Resource:
        """The tool's ``resource(call)``, in a child.

        Raises:
            ToolProcessError: the child died or broke the protocol, or the value is no ``Resource``.
            Exception: what the body raised (what a statement raised, as the very object).
        """
        return await self._call("resource", call, Resource)  # type: ignore[no-any-return]

    async def run(self, call: ToolInput[Any]) -> dict[str, Any]:
        """The tool's ``run(call)``, in a child (raises as ``resource``)."""
        return await self._call("run", call, dict)  # type: ignore[no-any-return]

    async def start(self) -> None:
        """Have one child ready, so that the first call's deadline does not pay for its start.

        Raises:
            ToolProcessError: the child could not start, or not load the tool.
        """
        if not self._idle:
            await self._release(await self._spawn())

    async def close(self) -> None:
        """Kill every child, idle or in flight (those calls fail); idempotent."""
        self._closed = True
        for task in self._warming:
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        self._idle.clear()
        for child in list(self._children):
            await self._discard(child)

    async def _call(self, method: str, call: ToolInput[Any], returns: type) -> Any:
        child = await self._acquire()
        fields = {f.name: getattr(call, f.name) for f in dataclasses.fields(call) if f.name != "conn"}
        try:
            value, raised = await self._exchange(child, method, fields, call.conn)
        except BaseException:
            # Cancelled (the deadline), or the child died or broke the protocol: killed,
            # never reused; a fresh one warms up for the next call.
            await self._discard(child)
            self._replenish()
            raise
        await self._release(child)
        if raised is not None:
            raise raised
        if not isinstance(value, returns):
            raise ToolProcessError(f"tool {self.name}: {method}() returned {type(value).__name__}", self.name)
        return value

    async def _exchange(
        self, child: _Child, method: str, fields: dict[str, Any], conn: Any
    ) -> tuple[Any, BaseException | None]:
        await child.send(("call", method, fields))
        raised: dict[int, BaseException] = {}  # what this call's statements raised, by number
        keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        while True:
            match await child.receive():
                case ("statement", int(seq), str(name), str(query), tuple(args), dict(kw)) if (
                    name in STATEMENTS
                ):
                    try:
                        value = _rows(await getattr(conn, name)(query, *args, **kw), keys)
                    except Exception as exc:
                        raised[seq] = exc
                        await child.send(("error", seq, encode_error(exc)))
                        continue
                    try:
                        await child.send(("result", seq, value))
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:
                        error = ToolProcessError(f"the result of {name}() does not pickle: {exc}", self.name)
                        await child.send(("error", seq, encode_error(error)))
                case ("returned", value):
                    return value, None
                case ("raised", encoded, seq):
                    # A statement's exception that the body let through is raised as the very
                    # object the statement raised (the gateway tells a duplicate by its class).
                    original = raised.get(seq) if isinstance(seq, int) else None
                    if original is not None:
                        return None, original
                    return None, decode_error(encoded, f"in tool {self.name}'s process", from_a_child=True)
                case other:
                    raise ToolProcessError(f"tool {self.name}'s process sent {other!r:.100}", self.name)

    async def _acquire(self) -> _Child:
        if not self._idle and self._warming:
            await asyncio.wait(self._warming)  # ready sooner than a child started now
        while self._idle:
            child = self._idle.pop()
            if child.proc.returncode is None:
                return child
            await self._discard(child)  # it died while idle
        return await self._spawn()

    async def _spawn(self) -> _Child:
        if self._closed:
            raise ToolProcessError(f"tool {self.name}: its processes are closed", self.name)
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral.supervisor.gateway._tool_worker", stdin=pipe, stdout=pipe
        )
        child = _Child(proc, self.name)
        self._children.add(child)
        try:
            async with asyncio.timeout(self._spawn_timeout_s):
                await child.send(("init", list(sys.path), self._files, self._pickled))
                answer = await child.receive()
        except BaseException as exc:
            await self._discard(child)
            if isinstance(exc, TimeoutError):
                why = f"was not ready within {self._spawn_timeout_s:g}s"
                raise ToolProcessError(
                    f"tool {self.name}'s process {why}", self.name, retryable=True
                ) from None
            raise
        if answer != ("ready",):
            await self._discard(child)
            failed = isinstance(answer, tuple) and answer[:1] == ("failed",)
            why = answer[1] if failed else f"it sent {answer!r:.100}"
            raise ToolProcessError(f"tool {self.name}'s process could not load it: {why}", self.name)
        logger.debug("tool %s: process %d ready", self.name, proc.pid)
        return child

    async def _release(self, child: _Child) -> None:
        if self._closed or len(self._idle) >= self._max_idle or child.proc.returncode is not None:
            await self._discard(child)
        else:
            self._idle.append(child)

    async def _discard(self, child: _Child) -> None:
        self._children.discard(child)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()

    def _replenish(self) -> None:
        if not (self._idle or self._warming or self._closed):
            task = asyncio.create_task(self._warm())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _warm(self) -> None:
        try:
            await self.start()
        except ToolProcessError as exc:  # the next call starts its own, and answers with this
            logger.warning("tool %s: no process warmed up: %s", self.name, exc)


class _Child:
    """One child process; its frames, one at a time."""

    def __init__(self, proc: asyncio.subprocess.Process, tool: str) -> None:
        self.proc = proc
        self._tool = tool

    async def send(self, message: Any) -> None:
        data = frame(message)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except ConnectionError as exc:
            raise await self._died() from exc

    async def receive(self) -> Any:
        assert self.proc.stdout is not None
        try:
            return await receive(self.proc.stdout, from_a_child=True)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise await self._died() from exc
        except pickle.UnpicklingError as exc:
            # What runs in the child was made to send more than data: never again.
            raise ToolProcessError(
                f"tool {self._tool}'s process sent a frame refused: {exc}", self._tool
            ) from exc

    async def _died(self) -> ToolProcessError:
        try:  # it closed its end: it is exiting, or is made to
            async with asyncio.timeout(2.0):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        logger.warning("tool %s: process %d exited with code %d", self._tool, self.proc.pid, code)
        why = f"tool {self._tool}'s process exited with code {code}"
        return ToolProcessError(why, self._tool, code, retryable=True)  # a fresh child may fare better


def _pickle_tool(tool: Tool[Any]) -> bytes:
    try:
        for cls in (type(tool), tool.arguments):
            if cls.__module__ == "__main__":
                raise pickle.PicklingError(f"{cls.__qualname__} is defined in __main__")
        pickle.dumps(tool.arguments)
        return pickle.dumps(tool, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ToolProcessError(
            f"tool {tool.name} cannot run in a process, it does not pickle ({exc}): its class and"
            " its arguments model must be defined at module level, not in __main__, and what it"
            " holds must pickle (no locks, connections or open files)",
            tool.name,
        ) from exc


def _rows(value: Any, keys: dict[tuple[str, ...], tuple[str, ...]]) -> Any:
    """asyncpg records (in lists too) as ``Row``; one tuple of column names per shape."""
    if isinstance(value, asyncpg.Record):
        names = tuple(value.keys())
        return Row(keys.setdefault(names, names), tuple(_rows(v, keys) for v in value.values()))
    if isinstance(value, list):
        return [_rows(v, keys) for v in value]
    return value

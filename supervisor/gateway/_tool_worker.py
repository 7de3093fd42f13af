"""The child end of ``ProcessTool`` (``python -m corral.supervisor.gateway._tool_worker``), and the wire
both ends speak: length-prefixed pickle frames over the child's stdin and stdout (its stderr
is the parent's: its logs, and what the tool prints, show there).

Parent to child, once, ``("init", sys.path, pickled tool)``; the child answers ``("ready",)``
or ``("failed", why)``. Per call ``("call", "resource" | "run", ToolInput fields but conn)``;
the child sends each statement of the body, ``("statement", n, fetch | fetchrow | fetchval |
execute | executemany, query, args, kwargs)``, the parent answers ``("result", n, value)``
(records as ``Row``) or ``("error", n, exception)``; last the child sends ``("returned",
value)`` or ``("raised", exception, n | None)``, ``n`` when the body let through the
exception of its statement ``n``. An exception crosses pickled if it unpickles as its own
class, else as ``ToolProcessError`` with its class and message; either way with its
traceback as a note. The child runs the gateway's own trusted tool code: frames are
unpickled as the tool module would be imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Iterator
from typing import Any, cast

import asyncpg

from corral.bus.errors import CorralError, is_retryable
from corral.supervisor.config._tools_module import import_tools
from corral.supervisor.gateway._tool_runner import Statements
from corral.supervisor.gateway._tools import Tool, ToolInput

_HEADER = struct.Struct("!I")  # the length of the pickle that follows
STATEMENTS = frozenset({"fetch", "fetchrow", "fetchval", "execute", "executemany"})
"""What a body may call on ``ctx.conn``."""


class ToolProcessError(CorralError):
    """A tool's process could not start or load the tool, died, or broke the protocol; or an
    exception that could not cross between the processes (its class and message in the text).

    Attributes:
        tool: The tool's name ("" when unknown).
        exit_code: The child's exit status, if it died (negative: the signal that ended it).
        retryable: A child that died or was slow to start: yes; one that cannot load the
            tool: no; an exception that could not cross: as ``bus.is_retryable`` said of it.
    """

    def __init__(
        self, message: str, tool: str = "", exit_code: int | None = None, *, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.tool = tool
        self.exit_code = exit_code
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (str(self), self.tool, self.exit_code, self.retryable)


def _rebuild(message: str, tool: str, exit_code: int | None, retryable: bool) -> ToolProcessError:
    return ToolProcessError(message, tool, exit_code, retryable=retryable)


class Row(tuple[Any, ...]):
    """A record as a body in the child sees it, with asyncpg ``Record``'s common surface: a
    tuple of the values (``row[0]``, ``len``, iteration) that is also read by column
    (``row["col"]``, ``get``, ``keys``, ``values``, ``items``; ``in`` tests the columns)."""

    _keys: tuple[str, ...]

    def __new__(cls, keys: tuple[str, ...], values: tuple[Any, ...]) -> Row:
        row = super().__new__(cls, values)
        row._keys = keys
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self._keys:
                raise KeyError(key)
            key = self._keys.index(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._keys else default

    def keys(self) -> Iterator[str]:
        return iter(self._keys)

    def values(self) -> Iterator[Any]:
        return super().__iter__()

    def items(self) -> Iterator[tuple[str, Any]]:
        return zip(self._keys, self.values(), strict=True)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __repr__(self) -> str:
        return "<Row " + " ".join(f"{k}={v!r}" for k, v in self.items()) + ">"

    def __reduce__(self) -> tuple[Any, ...]:
        return Row, (self._keys, tuple(self.values()))


_SENDABLE: dict[str, frozenset[str]] = {
    "builtins": frozenset({"complex", "set", "frozenset", "bytearray", "range", "slice"}),
    "datetime": frozenset({"date", "time", "datetime", "timedelta", "timezone"}),
    "decimal": frozenset({"Decimal"}),
    "uuid": frozenset({"UUID", "SafeUUID"}),
    "ipaddress": frozenset(
        {"IPv4Address", "IPv6Address", "IPv4Network", "IPv6Network", "IPv4Interface", "IPv6Interface"}
    ),
    "asyncpg.types": frozenset(
        {"Range", "Point", "Box", "Path", "Polygon", "Line", "LineSegment", "Circle", "BitString"}
    ),
    "corral.supervisor.gateway._tools": frozenset({"Resource", "EntityRef"}),
    "corral.supervisor.gateway._tool_worker": frozenset({"Row", "_rebuild"}),
}
"""What a child may send besides plain data: values a statement's parameters or a body's
result may hold, and corral's own frames. Exception classes of modules the gateway has
imported are allowed too; nothing else (a pickle naming ``builtins.exec`` would run it)."""


class _FromChild(pickle.Unpickler):
    """Reads a child's frames: a tool in the child is bounded, so what it sends may be hostile."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _SENDABLE.get(module, ()):
            return super().find_class(module, name)
        found = getattr(sys.modules.get(module), name, None) if "." not in name else None
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"a tool's process may not send {module}.{name}")


def from_child(data: bytes) -> Any:
    """A child's pickle, unpickled with only what ``_SENDABLE`` allows (and exceptions).

    Raises:
        pickle.UnpicklingError: it names anything else.
    """
    return _FromChild(io.BytesIO(data)).load()


def frame(message: Any) -> bytes:
    """``message`` as one frame."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def receive(reader: asyncio.StreamReader, *, from_a_child: bool = False) -> Any:
    """The next frame's message (``IncompleteReadError``: the other end closed its pipe);
    ``from_a_child``: read as ``from_child`` reads (in the gateway)."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    data = await reader.readexactly(size)
    return from_child(data) if from_a_child else pickle.loads(data)


def encode_error(exc: BaseException) -> tuple[str, Any, str, bool]:
    """("pickled", bytes, ...) if ``exc`` comes back as its own class, else ("generic",
    "<class>: <message>", ...); then its traceback and whether ``bus.is_retryable``."""
    where = "".join(traceback.format_exception(exc)).rstrip()
    retryable = is_retryable(exc)
    with contextlib.suppress(Exception):  # the generic form says what it was
        data = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        if type(pickle.loads(data)) is type(exc):
            return "pickled", data, where, retryable
    return "generic", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}", where, retryable


def decode_error(
    encoded: tuple[str, Any, str, bool], side: str, *, from_a_child: bool = False
) -> BaseException:
    """The exception ``encode_error`` encoded, with a note: where (``side``) and its traceback;
    ``from_a_child``: unpickled as ``from_child`` does."""
    kind, data, where, retryable = encoded
    exc: object = None
    if kind == "pickled":
        with contextlib.suppress(Exception):
            exc = from_child(data) if from_a_child else pickle.loads(data)
    if not isinstance(exc, BaseException):
        text = data if kind == "generic" else "an exception that does not unpickle"
        exc = ToolProcessError(text, retryable=retryable)
    exc.add_note(f"{side}:\n{where}")
    return exc


# --- the child -----------------------------------------------------------------------------------


class _Gateway(Statements):
    """The child's end of the pipes, and ``ctx.conn`` of its calls: each statement runs in
    the parent, on the call's connection."""

    def __init__(self, out: int) -> None:
        self._out = os.fdopen(out, "wb")
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._raised: dict[int, BaseException] = {}  # by the current call's statements
        self._seq = 0

    def send(self, message: Any) -> None:
        # Blocking: the parent reads while a call is in flight, and the child does nothing else.
        self._out.write(frame(message))
        self._out.flush()

    async def _statement(self, method: str, query: str, args: tuple[Any, ...], **kwargs: Any) -> Any:
        self._seq += 1
        seq = self._seq
        reply = self._replies[seq] = asyncio.get_running_loop().create_future()
        try:
            self.send(("statement", seq, method, query, args, kwargs))
            return await reply
        finally:
            del self._replies[seq]

    def settle(self, seq: int, value: Any, error: BaseException | None) -> None:
        reply = self._replies.get(seq)
        if reply is None or reply.done():
            return  # the body stopped waiting for it
        if error is None:
            reply.set_result(value)
        else:
            self._raised[seq] = error
            reply.set_exception(error)

    async def call(self, tool: Tool[Any], method: str, fields: dict[str, Any]) -> None:
        self._raised.clear()
        try:
            value = await getattr(tool, method)(ToolInput(**fields, conn=cast(asyncpg.Connection, self)))
        except Exception as exc:
            seq = next((s for s, e in self._raised.items() if e is exc), None)
            self.send(("raised", encode_error(exc), seq))
            return
        try:
            self.send(("returned", value))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            error = ToolProcessError(f"tool {tool.name}: {method}() returned what does not pickle: {exc}")
            self.send(("raised", encode_error(error), None))


async def _serve() -> None:
    # The protocol keeps the original stdin and stdout: what the tool prints goes to stderr,
    # what it reads is an empty stdin.
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, os.fdopen(proto_in, "rb"))
    gateway = _Gateway(proto_out)
    _, path, files, pickled = await receive(reader)
    sys.path[:] = path
    try:
        for file in files:
            import_tools(file)
        tool = pickle.loads(pickled)
    except Exception as exc:
        gateway.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    gateway.send(("ready",))
    calling: asyncio.Task[None] | None = None
    try:
        while True:
            try:
                message = await receive(reader)
            except asyncio.IncompleteReadError:
                return  # the parent closed its end
            match message:
                case ("call", str(method), dict(fields)):
                    calling = asyncio.create_task(gateway.call(tool, method, fields))
                case ("result", int(seq), value):
                    gateway.settle(seq, value, None)
                case ("error", int(seq), encoded):
                    gateway.settle(seq, None, decode_error(encoded, "in the gateway"))
    finally:
        if calling is not None:
            calling.cancel()
            await asyncio.gather(calling, return_exceptions=True)


def main() -> None:
    """The child: serve one tool's calls until the parent closes its end (or dies: on Linux
    the kernel then kills the child, which a body stuck in the CPU would otherwise outlive)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    asyncio.run(_serve())


if __name__ == "__main__":
    # The module's own copy, not ``__main__``'s: frames name its classes (``Row``).
    from corral.supervisor.gateway._tool_worker import main as _main

    _main()

"""How a child of ``corral up`` tells the launcher it serves: a line on an inherited pipe.

The launcher opens a pipe per process it starts, keeps the read end, and passes the write
end's descriptor to the child (``CORRAL_READY_FD``). The child's service writes ``ready``
on it once it serves (subscribed, bound: ``Service.wait_started()``) and closes it. The
launcher reads a line or the end of the pipe: ``ready``, or the child exited (or closed
the pipe) before it served. Nothing is polled, no file is written, and it works for an
agent run as a user of its own, which can write nothing in the state directory.

A process not started by ``corral up`` (compose, systemd, a terminal) has no such
descriptor and announces nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Protocol

logger = logging.getLogger(__name__)

READY_FD_ENV = "CORRAL_READY_FD"
"""The descriptor a child of ``corral up`` writes ``ready`` on once it serves."""

_READY = b"ready\n"


class _Startable(Protocol):
    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def wait_started(self) -> None: ...


class ReadyPipe:
    """The launcher's side of one child's readiness pipe.

    ``child_fd`` goes to the child (``pass_fds``, and ``child_env()``); once the child is
    started, ``started()`` closes this process's copy of it, so that the pipe ends when
    the child exits; ``wait()`` then answers whether it said ``ready`` first.
    """

    def __init__(self) -> None:
        self._read_fd: int | None
        self._read_fd, self.child_fd = os.pipe()
        self._child_open = True

    def child_env(self) -> dict[str, str]:
        """The child's environment entry naming its end of the pipe."""
        return {READY_FD_ENV: str(self.child_fd)}

    def started(self) -> None:
        """The child has its copy of the write end: close ours."""
        if self._child_open:
            os.close(self.child_fd)
            self._child_open = False

    async def wait(self) -> bool:
        """Whether the child said ``ready`` (True) before its end of the pipe closed (False:
        it exited, or closed it, before it served). Closes the pipe."""
        fd, self._read_fd = self._read_fd, None
        if fd is None:
            return False
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)  # the transport closes it
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            return await reader.readline() == _READY
        finally:
            transport.close()

    def close(self) -> None:
        """Close what ``wait()`` has not (a child that could not be started, a ``wait()``
        cancelled before it began)."""
        self.started()
        fd, self._read_fd = self._read_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class AnnouncedService:
    """Run ``service`` and write ``ready`` on ``fd`` once it serves.

    Args:
        service: What the process serves (it must set its started event once it serves).
        fd: The inherited write end of the launcher's readiness pipe.
    """

    def __init__(self, service: _Startable, fd: int) -> None:
        self._service = service
        self._fd: int | None = fd

    async def run(self) -> None:
        """Run the service; announce it once it serves, if it does before it stops."""
        running = asyncio.create_task(self._service.run(), name="announced")
        started = asyncio.create_task(self._service.wait_started())
        try:
            await asyncio.wait({running, started}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                self._announce()
            await running
        finally:
            self._close()
            for task in (running, started):
                task.cancel()
            await asyncio.gather(running, started, return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop the service (see its ``shutdown()``)."""
        await self._service.shutdown()

    def _announce(self) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, _READY)
        except OSError as exc:
            # The launcher is gone, or this process was not started by one as it thinks.
            logger.debug("cannot announce readiness: %s", exc)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def announced(service: _Startable, environ: Mapping[str, str] | None = None) -> _Startable | AnnouncedService:
    """``service``, announced to the launcher that started this process if one did
    (``CORRAL_READY_FD`` is set), else ``service`` itself."""
    if environ is None:
        # Not for the processes this one starts: in them the number names another file.
        value = os.environ.pop(READY_FD_ENV, "")
    else:
        value = environ.get(READY_FD_ENV, "")
    if not value.isdigit():
        return service
    fd = int(value)
    try:
        # Processes this one starts (a tool's worker) must not hold the launcher's pipe.
        os.set_inheritable(fd, False)
    except OSError:
        return service  # not open here: started by something else that set the variable
    return AnnouncedService(service, fd)

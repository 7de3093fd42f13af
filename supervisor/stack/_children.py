"""The launcher's child processes: each started, watched until it serves, and restarted.

One watcher task per child (re)starts it. A start ends one of two ways: the child says
it serves on its readiness pipe (``supervisor.stack._readiness``), or it exits first. A
child that has served once and then dies is restarted with backoff, however often. A
child that has never served and keeps failing at start (``start_attempts`` times in a
row, or once with the config-error exit code) stops the stack, with the end of its log:
a supervisor that cannot parse its policies fails the same way every time, and
restarting it forever only hides why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.supervisor.errors import LauncherError
from corral.supervisor.stack._readiness import ReadyPipe
from corral.supervisor.stack._runtime import ChildInfo

logger = logging.getLogger(__name__)

CONFIG_EXIT = 2
"""The exit code of a corral command given a bad config (the CLI's ``EXIT_CONFIG``): a
child that exits with it before serving will fail the same way again."""

TAIL_LINES = 12
"""Lines of a failed child's log shown with its error."""


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """When a child is restarted, and when the stack gives up on it."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    stable_after_s: float = 30.0
    """A child that ran this long restarts with the initial backoff again."""
    start_attempts: int = 3
    """Starts in a row that end before the child serves, for a child that never served,
    before the stack stops (a config-error exit stops it at the first)."""
    stop_timeout_s: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Launch:
    """How to start one child: its command, environment, log and ``Popen`` extras."""

    command: list[str]
    env: dict[str, str]
    log: Path
    popen_kwargs: dict[str, Any]


class Children:
    """The child processes of one launcher.

    Args:
        policy: Restarts and stopping.
        stopping: Set when the stack stops (by anyone): no child is restarted after it.
        on_change: Called whenever a child starts, serves or exits (the launcher rewrites
            ``runtime.json``).
    """

    def __init__(self, policy: RestartPolicy, stopping: asyncio.Event, on_change: Callable[[], None]) -> None:
        self._policy = policy
        self._stopping = stopping
        self._on_change = on_change
        self.infos: list[ChildInfo] = []
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._spawned = asyncio.Event()
        """Set whenever a child process starts (stopping waits for late ones too)."""
        self.changed = asyncio.Event()
        """Set whenever a child serves or exits, or the stack fails (``wait_ready`` waits on it)."""
        self.failure: LauncherError | None = None
        """Why the stack stopped, when a child kept failing at start."""

    def watch(self, info: ChildInfo, keep: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``keep()`` (which calls ``keep_running``) as ``info``'s watcher task."""
        self.infos.append(info)
        self._watchers.append(asyncio.create_task(keep(), name=info.name))

    def fail(self, error: LauncherError) -> None:
        """Stop the stack because of ``error`` (the first one wins)."""
        if self.failure is None:
            self.failure = error
        self._stopping.set()
        self.changed.set()

    async def keep_running(self, info: ChildInfo, launch: Launch, excused: Callable[[], bool]) -> None:
        """Start ``info``'s process, and again whenever it exits, until the stack stops.

        Args:
            info: The child (its pid, readiness and restarts are kept up to date).
            launch: How to start it.
            excused: Whether failing at start is expected of it now (a revoked agent).
        """
        policy = self._policy
        backoff, failed_starts, served_once = policy.backoff_initial_s, 0, False
        while not self._stopping.is_set():
            offset = _size(launch.log)
            proc, pipe = await self._spawn(info, launch)
            started = time.monotonic()
            served = await self._until_served(info, proc, pipe)
            served_once = served_once or served
            code = await proc.wait()
            info.ready = False
            self._changed()
            if self._stopping.is_set():
                break
            info.restarts += 1
            info.last_exit = code
            failed_starts = 0 if served else failed_starts + 1
            if not served_once and not excused():
                if code == CONFIG_EXIT or failed_starts >= policy.start_attempts:
                    self.fail(_start_failure(info, code, failed_starts, launch.log, offset))
                    return
            if time.monotonic() - started >= policy.stable_after_s:
                backoff = policy.backoff_initial_s
            logger.warning(
                "%s (pid %d) exited with %s%s; restart %d in %.1fs (log: %s)",
                info.name,
                proc.pid,
                describe_exit(code),
                "" if served else " before it served",
                info.restarts,
                backoff,
                launch.log,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, policy.backoff_max_s)

    async def _spawn(self, info: ChildInfo, launch: Launch) -> tuple[asyncio.subprocess.Process, ReadyPipe]:
        pipe = ReadyPipe()
        extra = dict(launch.popen_kwargs)
        extra["pass_fds"] = (*extra.get("pass_fds", ()), pipe.child_fd)
        try:
            with open(launch.log, "ab") as log:  # noqa: ASYNC230 - a local append
                proc = await asyncio.create_subprocess_exec(
                    *launch.command,
                    env={**launch.env, **pipe.child_env()},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # Ctrl-C reaches only the launcher
                    **extra,
                )
        except BaseException:
            pipe.close()
            raise
        pipe.started()
        self._procs[info.name] = proc
        self._spawned.set()
        info.pid = proc.pid
        self._changed()
        return proc, pipe

    async def _until_served(self, info: ChildInfo, proc: asyncio.subprocess.Process, pipe: ReadyPipe) -> bool:
        """Wait until ``proc`` serves (True) or exits first (False)."""
        said = asyncio.create_task(pipe.wait())
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({said, exited}, return_when=asyncio.FIRST_COMPLETED)
            # Both may be done: a child that served and exited at once still served.
            if said.done() and not said.cancelled() and said.exception() is None and said.result():
                info.ready = True
                self._changed()
                logger.info("%s (pid %d) serves", info.name, proc.pid)
                return True
            return False
        finally:
            said.cancel()
            exited.cancel()
            await asyncio.gather(said, exited, return_exceptions=True)
            pipe.close()

    def _changed(self) -> None:
        self.changed.set()
        self._on_change()

    async def stop(self) -> None:
        """Stop every child and return once each has exited and no watcher restarts one.

        ``stopping`` is set: a watcher ends once its child exits, but one that was starting
        its child when stopping began registers it only afterwards, so this stops children
        until every watcher is done.
        """
        self._stopping.set()
        while True:
            self._spawned.clear()
            await self._terminate([p for p in self._procs.values() if p.returncode is None])
            pending = [task for task in self._watchers if not task.done()]
            if not pending:
                break
            spawned = asyncio.create_task(self._spawned.wait())
            try:
                await asyncio.wait([*pending, spawned], return_when=asyncio.FIRST_COMPLETED)
            finally:
                spawned.cancel()
                await asyncio.gather(spawned, return_exceptions=True)
        # A watcher that could not start its child raised; its stack stops all the same.
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _terminate(self, procs: Sequence[asyncio.subprocess.Process]) -> None:
        """SIGTERM ``procs``, and SIGKILL those still running after ``stop_timeout_s``."""
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = self._policy.stop_timeout_s
        waits = [asyncio.wait_for(p.wait(), deadline) for p in procs]
        for result, proc in zip(await asyncio.gather(*waits, return_exceptions=True), procs, strict=True):
            if isinstance(result, TimeoutError):
                logger.warning("pid %d did not stop in %.0fs; killing it", proc.pid, deadline)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def describe_exit(code: int) -> str:
    """``code 1``, ``signal SIGKILL``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def log_tail(log: Path, offset: int = 0, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines ``log`` got past ``offset`` (what one run of a child wrote)."""
    try:
        with open(log, "rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _start_failure(info: ChildInfo, code: int, attempts: int, log: Path, offset: int) -> LauncherError:
    tail = log_tail(log, offset)
    times = "once" if attempts == 1 else f"{attempts} times in a row"
    head = f"{info.name} failed at start ({times}; it exited with {describe_exit(code)} before it served)"
    body = "\n".join(f"    {line}" for line in tail) if tail else "    (its log is empty)"
    return LauncherError(f"{head}. The end of {log}:\n{body}")


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0

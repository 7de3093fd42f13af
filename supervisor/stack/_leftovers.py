"""What a ``corral up`` that died without stopping its processes left running, and stopping it.

A launcher stops its children and its embedded servers on the way out; one that is
SIGKILLed (or crashes) cannot. So ``corral up`` starts a watchdog first,
``python -m corral.supervisor.stack._leftovers STATE_DIR``, in a session of its own, whose
stdin is a pipe only the launcher holds: when the launcher exits, however it exits, the
pipe ends. A launcher that stopped everything itself says ``stopped`` first, and the
watchdog just exits; otherwise it stops what the state directory says is left (the
children, then nats-server, then PostgreSQL) and removes ``runtime.json``.

``corral down`` uses the same ``find_leftovers`` / ``stop_leftovers`` when the launcher is
gone but its processes are not (the watchdog was killed too).

Every pid is checked before it is signalled (its command line names corral, this store
or this data directory), so a pid reused by an unrelated process is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from corral.supervisor.stack._runtime import Runtime, embedded_postgres_dir

logger = logging.getLogger(__name__)

STOPPED = b"stopped\n"
"""What a launcher writes to its watchdog once it has stopped everything itself."""

Kind = Literal["child", "nats", "postgres"]


@dataclass(frozen=True)
class Leftover:
    """A process of a stack whose launcher is gone."""

    name: str
    """``supervisor``, ``payments``, ``nats-server``, ``PostgreSQL``."""
    pid: int
    kind: Kind

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def find_leftovers(state_dir: Path, *, launcher_alive: bool | None = None) -> list[Leftover]:
    """The processes of the stack started from ``state_dir`` that still run, if its
    launcher is gone (``runtime.json``, nats-server's pid file, PostgreSQL's
    ``postmaster.pid``); empty while the launcher runs.

    Args:
        state_dir: The stack's state directory.
        launcher_alive: Whether its launcher runs (default: ask the kernel).
    """
    runtime = Runtime.recorded(state_dir)
    if launcher_alive is None:
        launcher_alive = runtime is not None and _running(runtime.pid)
    if launcher_alive:
        return []
    found: list[Leftover] = []
    for child in runtime.children if runtime is not None else []:
        if child.pid is not None and _matches(child.pid, "corral.supervisor"):
            found.append(Leftover(child.name, child.pid, "child"))
    nats_conf = str(state_dir / "nats" / "nats-server.conf")
    for pid in {runtime.nats_pid if runtime else None, _pid_file(state_dir / "nats" / "nats-server.pid")}:
        if pid is not None and _matches(pid, nats_conf):
            found.append(Leftover("nats-server", pid, "nats"))
    pgdata = embedded_postgres_dir(state_dir)
    pid = _pid_file(pgdata / "postmaster.pid")
    if pid is not None and _matches(pid, str(pgdata)):
        found.append(Leftover("PostgreSQL", pid, "postgres"))
    return found


def stop_leftovers(leftovers: Sequence[Leftover], timeout_s: float = 10.0) -> list[Leftover]:
    """Stop ``leftovers``: the children first (SIGTERM, then SIGKILL after ``timeout_s``),
    then nats-server (the same), then PostgreSQL (a fast shutdown, then an immediate one,
    then SIGKILL). Returns those that would not stop."""
    stubborn: list[Leftover] = []
    for kind, polite, rude in (
        ("child", signal.SIGTERM, signal.SIGKILL),
        ("nats", signal.SIGTERM, signal.SIGKILL),
        ("postgres", signal.SIGINT, signal.SIGQUIT),
    ):
        group = [item for item in leftovers if item.kind == kind]
        left = _signal_and_wait(group, polite, timeout_s)
        left = _signal_and_wait(left, rude, timeout_s)
        if kind == "postgres":
            left = _signal_and_wait(left, signal.SIGKILL, timeout_s)
        stubborn += left
    return stubborn


def _signal_and_wait(items: Sequence[Leftover], sig: signal.Signals, timeout_s: float) -> list[Leftover]:
    """Send ``sig`` to each of ``items``; those still running after ``timeout_s``."""
    for item in items:
        with contextlib.suppress(psutil.Error):
            psutil.Process(item.pid).send_signal(sig)
    deadline = time.monotonic() + timeout_s
    left = list(items)
    while left and time.monotonic() < deadline:
        left = [item for item in left if _running(item.pid)]
        if left:
            time.sleep(0.05)
    return left


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _matches(pid: int, needle: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``needle``."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and needle in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _pid_file(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, ValueError, IndexError):
        return None


def watch(state_dir: Path) -> int:
    """The watchdog: wait for stdin to end; unless the launcher said ``stopped``, stop what
    it left running and remove its ``runtime.json``."""
    said = sys.stdin.buffer.read()  # returns once every holder of the write end is gone
    if said.endswith(STOPPED):
        return 0
    # The launcher may still be exiting; whatever it is doing, it has let go of the pipe.
    leftovers = find_leftovers(state_dir, launcher_alive=False)
    logger.warning("the launcher is gone; stopping %s", ", ".join(map(str, leftovers)) or "nothing")
    stubborn = stop_leftovers(leftovers)
    if stubborn:
        logger.error("would not stop: %s", ", ".join(map(str, stubborn)))
        return 1
    with contextlib.suppress(OSError):
        (state_dir / "runtime.json").unlink()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s watchdog: %(message)s")
    sys.exit(watch(Path(sys.argv[1])))

"""Where a running stack is: the state directory and its ``runtime.json``.

``corral up`` writes ``runtime.json`` (its pid, the NATS URL, the child processes), mode
0600; ``corral send``, ``status`` and ``down`` read it to find the stack. It holds no
database DSN: the operator commands find an embedded PostgreSQL through its data directory
(``embedded_database_url``), which only the user who runs ``corral up`` can read, and a
configured one through ``DATABASE_URL`` / ``database.url`` (``Settings.database_url``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class ChildInfo:
    """One child process of the launcher."""

    name: str
    role: str
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    uid: int | None = None
    """The user it runs as, when ``corral up`` (as root) gave it one of its own."""
    ready: bool = False
    """Whether the process serves (it said so on its readiness pipe); False while it
    starts, and again once it has exited."""


@dataclass(kw_only=True)
class Runtime:
    """What ``corral up`` started."""

    pid: int
    nats_url: str
    embedded_nats: bool
    embedded_postgres: bool
    nats_monitor_url: str | None = None
    """The embedded server's monitoring endpoint, only when configured (``nats.monitor_port``)."""
    nats_pid: int | None = None
    """The embedded nats-server's pid."""
    postgres_pid: int | None = None
    """The embedded PostgreSQL's postmaster pid."""
    watchdog_pid: int | None = None
    """The process that stops everything above if the launcher dies without doing so
    (see ``supervisor.stack._leftovers``)."""
    children: list[ChildInfo] = field(default_factory=list)
    api_url: str | None = None
    """Where the HTTP/SSE API listens (None: ``api.enabled`` is false)."""

    def write(self, state_dir: Path) -> None:
        """Atomically replace ``runtime.json`` (mode 0600)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "runtime.json.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / "runtime.json")

    @classmethod
    def read(cls, state_dir: Path) -> Runtime | None:
        """The runtime of a stack started from ``state_dir``, if its launcher is alive."""
        runtime = cls.recorded(state_dir)
        return runtime if runtime is not None and pid_alive(runtime.pid) else None

    @classmethod
    def recorded(cls, state_dir: Path) -> Runtime | None:
        """What ``runtime.json`` records, whether or not its launcher is alive (a launcher
        that was killed leaves it behind: ``corral down`` stops what it names)."""
        try:
            raw = json.loads((state_dir / "runtime.json").read_text())
        except (OSError, ValueError):
            return None
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        fields = ChildInfo.__dataclass_fields__
        children = [ChildInfo(**{k: v for k, v in c.items() if k in fields}) for c in raw.get("children", [])]
        try:
            return cls(**{**known, "children": children})
        except TypeError:
            return None  # not a runtime file of this version


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_postgres_dir(state: Path) -> Path:
    """The embedded PostgreSQL's data directory under a state directory."""
    return state / "postgres"


def embedded_database_url(state: Path) -> str | None:
    """The superuser DSN of the embedded PostgreSQL running from ``state``, if one runs.

    Read from its ``postmaster.pid`` (the socket directory is line 5), which only the user
    that runs ``corral up`` (and PostgreSQL's own) can read: the DSN is never written down.
    """
    try:
        lines = (embedded_postgres_dir(state) / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 5 or not lines[4].strip():
        return None
    return f"postgresql://postgres:@/postgres?host={lines[4].strip()}"


def nats_servers(url: str) -> list[str]:
    """Split a comma-separated list of NATS URLs."""
    return [u.strip() for u in url.split(",") if u.strip()]

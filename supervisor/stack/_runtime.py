"""Where a running stack is: the state directory and its ``runtime.json``.

``corral up`` writes ``runtime.json`` (its pid, the NATS URL, the child processes), mode
0600; ``corral send``, ``status`` and ``down`` read it to find the stack. It holds no
database DSN: the operator commands find an embedded PostgreSQL through its data directory
(``embedded_database_url``), which only the user who runs ``corral up`` can read, and a
configured one through ``DATABASE_URL`` / ``database.url``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corral.bus import TopologyConfig
from corral.supervisor.config._config import LoadedConfig


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


@dataclass(kw_only=True)
class Runtime:
    """What ``corral up`` started."""

    pid: int
    nats_url: str
    embedded_nats: bool
    embedded_postgres: bool
    nats_monitor_url: str | None = None
    """The embedded server's monitoring endpoint, only when configured (``nats.monitor_port``)."""
    children: list[ChildInfo] = field(default_factory=list)

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
        try:
            raw = json.loads((state_dir / "runtime.json").read_text())
        except (OSError, ValueError):
            return None
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        runtime = cls(**{**known, "children": [ChildInfo(**c) for c in raw.get("children", [])]})
        return runtime if pid_alive(runtime.pid) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_dir(loaded: LoadedConfig) -> Path:
    """``CORRAL_STATE_DIR`` if set, else the config's ``state_dir``."""
    return Path(os.environ.get("CORRAL_STATE_DIR") or loaded.config.state_dir).resolve()


def configured_nats_url(loaded: LoadedConfig) -> str | None:
    """``NATS_URL`` if set, else the config's ``nats.url``."""
    return os.environ.get("NATS_URL") or loaded.config.nats.url


def configured_database_url(loaded: LoadedConfig) -> str | None:
    """``DATABASE_URL`` if set, else the config's ``database.url``."""
    return os.environ.get("DATABASE_URL") or loaded.config.database.url


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


def configured_supervisor_database_url(loaded: LoadedConfig) -> str | None:
    """``CORRAL_SUPERVISOR_DATABASE_URL`` if set, else the config's ``database.supervisor_url``."""
    return os.environ.get("CORRAL_SUPERVISOR_DATABASE_URL") or loaded.config.database.supervisor_url


def monitor_port(loaded: LoadedConfig) -> int | None:
    """``CORRAL_NATS_MONITOR_PORT`` if set (empty: off), else ``nats.monitor_port``."""
    value = os.environ.get("CORRAL_NATS_MONITOR_PORT")
    if value is None:
        return loaded.config.nats.monitor_port
    return int(value) if value.strip() else None


def topology(loaded: LoadedConfig) -> TopologyConfig:
    """Stream settings: ``CORRAL_STREAM_REPLICAS`` if set, else ``nats.stream_replicas``."""
    replicas = os.environ.get("CORRAL_STREAM_REPLICAS")
    nats = loaded.config.nats
    return TopologyConfig(
        replicas=int(replicas) if replicas else nats.stream_replicas,
        ack_wait_s=nats.ack_wait_s,
        max_deliver=nats.max_deliver,
        dead_letter_max_bytes=loaded.config.limits.dead_letter_max_bytes,
        dead_letter_max_age_s=loaded.config.limits.dead_letter_max_age_s,
    )


def creds_dir(loaded: LoadedConfig) -> Path:
    """Where the identities' nkey seeds live."""
    return state_dir(loaded) / "creds"


def credentials_for(loaded: LoadedConfig, identity: str) -> Path | None:
    """This process's seed: ``CORRAL_CREDS`` if set, else ``<state_dir>/creds/<identity>.nk``
    if present (the server then requires identities), else None (an open server)."""
    explicit = os.environ.get("CORRAL_CREDS")
    if explicit:
        return Path(explicit)
    path = creds_dir(loaded) / f"{identity}.nk"
    try:
        return path if path.exists() else None
    except PermissionError:
        return None  # an agent run as its own user cannot look into the state directory


def nats_servers(url: str) -> list[str]:
    """Split a comma-separated list of NATS URLs."""
    return [u.strip() for u in url.split(",") if u.strip()]

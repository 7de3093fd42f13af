"""Where a running stack is: the state directory and its ``runtime.json``.

``corral up`` writes ``runtime.json`` (its pid, the NATS and PostgreSQL URLs, the child
processes); ``corral send``, ``status`` and ``down`` read it to find the stack.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bus import TopologyConfig
from supervisor._config import LoadedConfig


@dataclass(kw_only=True)
class ChildInfo:
    """One child process of the launcher."""

    name: str
    role: str
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None


@dataclass(kw_only=True)
class Runtime:
    """What ``corral up`` started."""

    pid: int
    nats_url: str
    database_url: str
    embedded_nats: bool
    embedded_postgres: bool
    nats_monitor_url: str | None = None
    children: list[ChildInfo] = field(default_factory=list)

    def write(self, state_dir: Path) -> None:
        """Atomically replace ``runtime.json``."""
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "runtime.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / "runtime.json")

    @classmethod
    def read(cls, state_dir: Path) -> Runtime | None:
        """The runtime of a stack started from ``state_dir``, if its launcher is alive."""
        try:
            raw = json.loads((state_dir / "runtime.json").read_text())
        except (OSError, ValueError):
            return None
        runtime = cls(**{**raw, "children": [ChildInfo(**c) for c in raw.get("children", [])]})
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


def topology(loaded: LoadedConfig) -> TopologyConfig:
    """Stream settings: ``CORRAL_STREAM_REPLICAS`` if set, else ``nats.stream_replicas``."""
    replicas = os.environ.get("CORRAL_STREAM_REPLICAS")
    nats = loaded.config.nats
    return TopologyConfig(
        replicas=int(replicas) if replicas else nats.stream_replicas,
        ack_wait_s=nats.ack_wait_s,
        max_deliver=nats.max_deliver,
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
    return path if path.exists() else None


def nats_servers(url: str) -> list[str]:
    """Split a comma-separated list of NATS URLs."""
    return [u.strip() for u in url.split(",") if u.strip()]

"""What an agent process inherits of the launcher's environment: only what runs Python and
corral. Provider keys (``OPENAI_API_KEY`` …), database URLs, cloud credentials and anything
else the launcher's shell holds stay behind: an agent holds no secret but its own NATS seed,
so a compromised agent, or a compromised package it imports, has none to take."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from corral.supervisor.stack._settings import DATABASE_PREPARED_ENV

PARENT_PID_ENV = "CORRAL_PARENT_PID"
"""The launcher's pid, which a child watches (it stops once the launcher is gone)."""

_KEEP = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED",
        "PYTHONWARNINGS",
        "PYTHONFAULTHANDLER",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
)
_KEEP_PREFIXES = ("LC_", "COVERAGE_")
_AGENT_CORRAL = frozenset({"CORRAL_STATE_DIR", "CORRAL_LOG_LEVEL", "CORRAL_READY_FD"})


def agent_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` an agent process may see (an allow-list: what is not named here
    does not pass)."""
    return {
        name: value
        for name, value in env.items()
        if name in _KEEP or name.startswith(_KEEP_PREFIXES) or name in _AGENT_CORRAL
    }


def child_environment(
    launcher: Mapping[str, str],
    *,
    trusted: bool,
    nats_url: str,
    state_dir: Path,
    parent_pid: int,
    seed: Path | None,
    service_dsn: str | None,
) -> dict[str, str]:
    """The environment of one child of ``corral up``: a service (``trusted``: the
    supervisor, a separate tool gateway, the model gateway) gets the launcher's with the
    services' database role; an agent gets only ``agent_environment``. Each gets its own
    seed only, and the launcher's pid to watch."""
    env = {
        **(launcher if trusted else agent_environment(launcher)),
        "NATS_URL": nats_url,
        # The children find the seeds where this launcher put them, however it chose.
        "CORRAL_STATE_DIR": str(state_dir),
        PARENT_PID_ENV: str(parent_pid),
    }
    if seed is not None:
        env["CORRAL_CREDS"] = str(seed)  # each process gets its own identity only
    for name in ("DATABASE_URL", "CORRAL_SUPERVISOR_DATABASE_URL", DATABASE_PREPARED_ENV):
        env.pop(name, None)  # agents never hold the database's credentials
    if trusted:
        assert service_dsn is not None
        env["DATABASE_URL"] = service_dsn
        # Migrations and the tools' setup ran as the owner: the service runs no DDL.
        env[DATABASE_PREPARED_ENV] = "1"
    return env

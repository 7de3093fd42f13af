"""What an agent process inherits of the launcher's environment: only what runs Python and
corral. Provider keys (``OPENAI_API_KEY`` …), database URLs, cloud credentials and anything
else the launcher's shell holds stay behind: an agent holds no secret but its own NATS seed,
so a compromised agent, or a compromised package it imports, has none to take."""

from __future__ import annotations

from collections.abc import Mapping

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

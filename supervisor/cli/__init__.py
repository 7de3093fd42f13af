"""The ``corral`` command line: shared helpers (``_shared``), and one module per command
group (``_stack``: running the team; ``_talk``: talking to it, and ``_status`` what
``corral status`` reports; ``_conversations``: what happened to a conversation; ``_init``:
a starter team; ``_demo``: the demo; ``_reset``: deleting the state; ``_services``: the
services; ``_operator``: kill switches, credentials, audit, approvals, rollback).

Every command module imports only typer and light modules at its top, and what a command
needs (NATS, PostgreSQL, Cedar, litellm) inside it: ``corral --help`` and a command's
start pay only for what it uses (``bench/cli_startup.py`` measures it).
"""

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

SERVICES = frozenset({"agent", "supervisor", "gateway", "router"})
"""The commands that run a long-lived service (and may call a model provider over HTTP)."""


class _NatsWithoutWebSockets(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``nats.aio.transport`` with aiohttp out of sight, so that it skips it.

    nats-py imports aiohttp only for WebSocket URLs (``ws://``), which a command does not
    use, and that import is about a third of a command's start. The transport keeps
    ``aiohttp = None`` (as it does where aiohttp is not installed) until a command connects
    to a ``ws://`` server (``_shared._connect`` hands it aiohttp then); every other import
    of aiohttp, before or after, is the real one.
    """

    NAME = "nats.aio.transport"

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.NAME or "aiohttp" in sys.modules:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # `import aiohttp` fails here
        try:
            self._loader.exec_module(module)
        finally:
            del sys.modules["aiohttp"]


def main() -> None:
    """Entry point of the ``corral`` console script."""
    if not SERVICES.intersection(sys.argv[1:2]):
        # A client or operator command; a service (an agent calling its provider through
        # litellm) imports nats-py whole.
        sys.meta_path.insert(0, _NatsWithoutWebSockets())
    # Each group module registers its commands on the shared app when imported; the app
    # module imports none of them back.
    from corral.supervisor.cli import (  # noqa: F401
        _api,
        _conversations,
        _demo,
        _init,
        _operator,
        _queue,
        _reset,
        _services,
        _stack,
        _talk,
        _trace,
        _validate,
    )
    from corral.supervisor.cli._shared import app

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    app()

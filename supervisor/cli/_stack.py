"""`corral up`, `migrate`, `down`: running the team."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import typer

from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    _load,
    _run,
    _setup_logging,
    app,
    console,
    err_console,
)
from corral.supervisor.stack._runtime import Runtime
from corral.supervisor.stack._settings import Settings

if TYPE_CHECKING:
    from corral.supervisor.stack._launcher import Launcher

# --- the stack ------------------------------------------------------------------------


def _launcher(settings: Settings, replicas: dict[str, int] | None = None) -> Launcher:
    from corral.supervisor.stack._launcher import Launcher, LauncherConfig

    return Launcher(LauncherConfig(settings=settings, replicas=replicas or {}))


def _parse_replicas(settings: Settings, values: list[str]) -> dict[str, int]:
    """``["payments=2"]`` -> ``{"payments": 2}``, checked against the config."""
    out: dict[str, int] = {}
    for value in values:
        name, _, count = value.partition("=")
        if name not in settings.config.agents or not count.isdigit() or int(count) < 1:
            err_console.print(
                f"--replicas {value!r}: expected AGENT=N with N >= 1 and AGENT one of "
                f"{', '.join(settings.loaded.agent_names)}"
            )
            raise typer.Exit(EXIT_CONFIG)
        out[name] = int(count)
    return out


async def _with_stack(
    settings: Settings,
    body: Callable[[Runtime], Awaitable[int]] | None,
    replicas: dict[str, int] | None = None,
) -> int:
    """Run the stack while ``body`` runs (a negative code: until a signal stops it; no body:
    until then too); leaving stops every process and waits for each to exit."""
    launcher = _launcher(settings, replicas)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(launcher.shutdown()))
    async with launcher:
        runtime = launcher.runtime
        assert runtime is not None  # start() sets it
        console.print(
            f"corral is up: NATS {runtime.nats_url}; "
            f"{len(runtime.children)} processes; logs in {settings.state_dir / 'logs'}"
        )
        code = 0
        if body is not None:
            code = await body(runtime)
        if body is None or code < 0:
            console.print("Ctrl-C stops everything.")
            await launcher.wait()
            return 0
        return code


@app.command()
def up(
    config: ConfigOption = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option("--replicas", help="AGENT=N: run N processes of AGENT (they share its inbox)"),
    ] = None,
) -> None:
    """Start NATS and PostgreSQL (embedded unless configured), the supervisor and every agent."""
    settings = _load(config)
    counts = _parse_replicas(settings, replicas or [])
    _setup_logging()
    _run(_with_stack(settings, None, counts))


@app.command()
def migrate(config: ConfigOption = None) -> None:
    """As the database's owner (``DATABASE_URL``): apply corral's migrations, which create the
    roles ``corral_supervisor`` and ``corral_tools`` if this role may, and run the tools'
    ``setup``. With ``CORRAL_SUPERVISOR_PASSWORD`` set, it also becomes
    ``corral_supervisor``'s password (the supervisor's DSN then names that role).
    ``corral up`` does all of this itself."""
    settings = _load(config)

    async def _main() -> int:
        from corral.supervisor.cli._shared import _database_url
        from corral.supervisor.store._roles import SUPERVISOR_ROLE, prepare_database, set_password

        url = _database_url(settings)
        tools = settings.config.tools
        await prepare_database(url, tools.reference if tools is not None else None)
        password = settings.supervisor_password
        if password:
            await set_password(url, password)
            console.print(f"{SUPERVISOR_ROLE}'s password set", highlight=False)
        console.print("database migrated", highlight=False)
        return 0

    _run(_main())


@app.command()
def down(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
) -> None:
    """Stop a stack started by ``corral up`` from this directory."""
    settings = _load(config)
    runtime = Runtime.read(settings.state_dir)
    if runtime is None:
        console.print("corral is not running here")
        raise typer.Exit(0)
    os.kill(runtime.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Runtime.read(settings.state_dir) is None:
            console.print("corral stopped")
            raise typer.Exit(0)
        time.sleep(0.1)
    err_console.print(f"corral (pid {runtime.pid}) did not stop within {timeout:.0f}s")
    raise typer.Exit(1)

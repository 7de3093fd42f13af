"""What the ``corral`` command groups share: the app and its sub-apps, the consoles, exit
codes, loading the config, connecting, and running a service until it is told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console

from corral.bus import (
    Bus,
    BusConfig,
    CorralError,
    Serving,
    connect,
)
from corral.supervisor.errors import ConfigError
from corral.supervisor.stack._runtime import Runtime, embedded_database_url, nats_servers
from corral.supervisor.stack._settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="corral: run a team of AI agents in production.",
)
agent_app = typer.Typer(no_args_is_help=True, help="Run one agent as a service.")
supervisor_app = typer.Typer(no_args_is_help=True, help="Run the supervisor as a service.")
app.add_typer(agent_app, name="agent")
app.add_typer(supervisor_app, name="supervisor")
gateway_app = typer.Typer(no_args_is_help=True, help="Run the tool gateway as its own service.")
app.add_typer(gateway_app, name="gateway")
kill_app = typer.Typer(no_args_is_help=True, help="Kill an agent or a conversation (durable).")
revive_app = typer.Typer(no_args_is_help=True, help="Undo `corral kill agent`.")
app.add_typer(kill_app, name="kill")
app.add_typer(revive_app, name="revive")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="corral.yaml (default: ./corral.yaml, else the sample team)"),
]

EXIT_NOT_REPLIED = 1
EXIT_CONFIG = 2
EXIT_WAITING = 3
EXIT_TIMEOUT = 4


def _load(config: str | None) -> Settings:
    """The command's settings: the config ``-c`` names and the environment, read once."""
    try:
        return Settings.load(config)
    except ConfigError as exc:
        err_console.print(f"[red]config error[/red]\n{exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from exc


def _setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("nats", "asyncio", "LiteLLM", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _nats_url(settings: Settings) -> str:
    return settings.nats_url or _running(settings, "NATS server", "NATS_URL").nats_url


def _database_url(settings: Settings) -> str:
    """The configured DSN, else the embedded PostgreSQL's, found through the state directory
    (``runtime.json`` holds no DSN)."""
    url = settings.database_url
    if url:
        return url
    _running(settings, "database", "DATABASE_URL")
    embedded = embedded_database_url(settings.state_dir)
    if embedded is None:
        err_console.print(
            f"no database: the stack in {settings.state_dir} uses no embedded PostgreSQL "
            "that this user can reach; set DATABASE_URL"
        )
        raise typer.Exit(1)
    return embedded


def _running(settings: Settings, what: str, variable: str) -> Runtime:
    runtime = Runtime.read(settings.state_dir)
    if runtime is None:
        err_console.print(f"no {what}: start the team with `corral up` or set {variable}")
        raise typer.Exit(1)
    return runtime


def _run(coro: Coroutine[Any, Any, int]) -> None:
    try:
        # uvloop (libuv) where it is installed: the same asyncio, with less overhead per
        # message; the standard loop otherwise (e.g. on Windows).
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(coro)
    except CorralError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


async def _serve(service: Serving) -> None:
    """Run ``service`` until SIGTERM/SIGINT, or until the launcher that started us dies."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.shutdown()))
    parent = os.environ.get("CORRAL_PARENT_PID")
    watcher = asyncio.create_task(_watch_parent(int(parent), service)) if parent else None
    try:
        await service.run()
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def _watch_parent(pid: int, service: Serving) -> None:
    # An orphaned child must not keep consuming after its launcher was killed.
    while os.getppid() == pid:  # noqa: ASYNC110 - nothing to wait on but the kernel's answer
        await asyncio.sleep(1.0)
    logging.getLogger(__name__).warning("launcher %d is gone; stopping", pid)
    await service.shutdown()


async def _connect(settings: Settings, url: str, identity: str, *, forever: bool = True) -> Bus:
    """Connect as ``identity``, with its seed when the server requires identities."""
    seed = settings.credentials_for(identity)
    return await connect(
        BusConfig(
            servers=nats_servers(url),
            name=f"corral-{identity}",
            identity=identity,
            nkey_seed_file=str(seed) if seed else None,
            reconnect_forever=forever,
        )
    )

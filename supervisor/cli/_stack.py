"""`corral up`, `migrate`, `down`: running the team."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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

if TYPE_CHECKING:
    from corral.supervisor.stack._launcher import Launcher
    from corral.supervisor.stack._runtime import ChildInfo, Runtime
    from corral.supervisor.stack._settings import Settings

EXIT_STOPPED = 130
"""``corral up`` stopped by a signal before every process served (as Ctrl-C's 128 + 2)."""

LAUNCHER_LOG = "launcher.log"
"""The launcher's own log under ``<state_dir>/logs``: everything it logs, PostgreSQL's
start-up detail included, whatever the terminal shows."""

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
    *,
    verbose: bool = False,
) -> int:
    """Check the team (``corral validate``), start it, and once every process serves run
    ``body`` (a negative code: then until a signal stops it; no body: until then too);
    leaving stops every process and waits for each to exit.

    Returns 2 when the check fails (nothing is started), 1 when the stack stops by itself
    (a process kept failing at start: its error is printed), 130 when a signal stops it
    before every process serves, else ``body``'s code (0 without one).
    """
    import signal

    from corral.supervisor.cli._validate import print_invalid
    from corral.supervisor.errors import ConfigError, LauncherError
    from corral.supervisor.stack._launcher import prepare_state_dir
    from corral.supervisor.stack._validate import check

    try:
        checked = check(settings)
    except ConfigError as exc:
        print_invalid(exc)
        return EXIT_CONFIG
    console.print(f"checked {settings.path}: {', '.join(c.what for c in checked)}", highlight=False)
    prepare_state_dir(settings.state_dir)
    launcher = _launcher(settings, replicas)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(launcher.shutdown()))
    with _logging_to(settings.state_dir / "logs" / LAUNCHER_LOG, verbose=verbose):
        async with launcher:
            runtime = launcher.runtime
            assert runtime is not None  # start() sets it
            try:
                await _until_ready(launcher, runtime, settings.state_dir / "logs")
            except LauncherError as exc:
                if launcher.failure is None and launcher.stopping:
                    err_console.print(str(exc), highlight=False)
                    return EXIT_STOPPED
                err_console.print(f"[red]error:[/red] {exc}\nstopping corral", highlight=False)
                return 1
            if runtime.api_url:
                await print_console_login(settings, runtime.api_url)
            code = 0
            if body is not None:
                code = await body(runtime)
            if body is None or code < 0:
                console.print("Ctrl-C stops everything.")
                await launcher.wait()
                if launcher.failure is not None:
                    err_console.print(f"[red]error:[/red] {launcher.failure}", highlight=False)
                    return 1
                return 0
            return code


async def print_console_login(settings: Settings, api_url: str, operator: str = "console") -> None:
    """Print the console's URL with a one-time operator login (15 minutes, once)."""
    from corral.supervisor.cli._shared import _database
    from corral.supervisor.store._console import create_login

    conn = await _database(settings)
    try:
        login = await create_login(conn, operator, LOGIN_TTL_S)
    finally:
        await conn.close()
    console.print(
        f"console: {api_url}/console/ — sign in once with {api_url}/console/#login={login} "
        f"(as operator {operator!r}; valid {LOGIN_TTL_S / 60:.0f} minutes; "
        "`corral console-login` prints another)",
        highlight=False,
        soft_wrap=True,
    )


LOGIN_TTL_S = 900.0


async def _until_ready(launcher: Launcher, runtime: Runtime, logs: Path) -> None:
    """Print each process as it comes to serve, and who is still awaited every 10 s;
    then that corral is up."""
    names = [c.name for c in runtime.children if c.role not in launcher.revoked]
    console.print(f"waiting for {', '.join(names)}…", highlight=False)

    def _ready(info: ChildInfo, seconds: float) -> None:
        console.print(f"  {info.name} serves ({seconds:.1f} s)", highlight=False)

    def _waiting(waiting: list[ChildInfo], seconds: float) -> None:
        console.print(
            f"  waiting for {', '.join(c.name for c in waiting)}… ({seconds:.0f} s)", highlight=False
        )

    await launcher.wait_ready(_ready, _waiting)
    for agent in launcher.revoked:
        console.print(
            f"  {agent} is killed: its identity is revoked (`corral revive agent {agent}`)", highlight=False
        )
    serving = sum(1 for c in runtime.children if c.ready)
    api = f"; API {runtime.api_url}" if runtime.api_url else ""
    console.print(
        f"corral is up: NATS {runtime.nats_url}{api}; {serving} processes serve; logs in {logs}",
        highlight=False,
    )


@contextmanager
def _logging_to(path: Path, *, verbose: bool) -> Iterator[None]:
    """Log everything at INFO to ``path`` too; the terminal keeps its level and, unless
    ``verbose``, shows no INFO detail of PostgreSQL's start (pgserver's commands and their
    output) or of the migrations it applied."""
    root = logging.getLogger()
    terminal = list(root.handlers)
    before = root.level
    for handler in terminal:
        if handler.level < before:
            handler.setLevel(before)
        if not verbose:
            # Kept when the block is left: pgserver's exit hook logs once more at exit.
            handler.addFilter(_QUIET)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file)
    root.setLevel(min(before, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(file)
        file.close()
        root.setLevel(before)


class _Detail(logging.Filter):
    """Drops INFO detail the terminal need not show (the launcher's log keeps it): pgserver's
    commands and their output, the migrations applied, and each child's "serves" (``up``
    prints its own line for each while starting)."""

    NAMES = ("pgserver", "corral.supervisor.store", "corral.supervisor.stack._children")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.NAMES)


_QUIET = _Detail()


@app.command()
def up(
    config: ConfigOption = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option("--replicas", help="AGENT=N: run N processes of AGENT (they share its inbox)"),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show PostgreSQL's start-up detail and migrations")
    ] = False,
) -> None:
    """Check the team (as `corral validate`), then start NATS and PostgreSQL (embedded
    unless configured), the supervisor and every agent; say "corral is up" once every
    process serves. A process that keeps failing at start stops it, with its error."""
    from corral.supervisor.cli._validate import print_invalid
    from corral.supervisor.errors import ConfigError
    from corral.supervisor.stack._validate import load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print_invalid(exc)
        raise typer.Exit(EXIT_CONFIG) from None
    counts = _parse_replicas(settings, replicas or [])
    _setup_logging()
    _run(_with_stack(settings, None, counts, verbose=verbose))


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
    """Stop a stack started by ``corral up`` from this directory, or what one whose
    launcher was killed left running."""
    import os
    import signal
    import time

    from corral.supervisor.stack._runtime import Runtime

    settings = _load(config)
    runtime = Runtime.read(settings.state_dir)
    if runtime is None:
        _stop_leftovers(settings.state_dir, timeout)
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


def _stop_leftovers(state_dir: Path, timeout: float) -> None:
    """No launcher runs from ``state_dir``: stop what a killed one left running, if anything."""
    from corral.supervisor.stack._leftovers import find_leftovers, stop_leftovers

    leftovers = find_leftovers(state_dir, launcher_alive=False)
    if not leftovers:
        console.print("corral is not running here")
        return
    console.print(
        f"corral's launcher is gone; stopping what it left running: {', '.join(map(str, leftovers))}",
        highlight=False,
    )
    stubborn = stop_leftovers(leftovers, timeout_s=min(timeout, 10.0))
    if stubborn:
        err_console.print(f"would not stop: {', '.join(map(str, stubborn))}", highlight=False)
        raise typer.Exit(1)
    (state_dir / "runtime.json").unlink(missing_ok=True)
    console.print("corral stopped")

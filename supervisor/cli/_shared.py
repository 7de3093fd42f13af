"""What the ``corral`` command groups share: the app and its sub-apps, the consoles and the
ways output is printed (tables, JSON), exit codes, loading the config, connecting, and
running a service until it is told to stop.

This module imports only typer at module level, and the command modules import only it
(and light things): ``corral --help`` registers every command without loading NATS,
PostgreSQL, Cedar or litellm, and a command loads what it uses when it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from corral.bus import Bus, Serving
    from corral.supervisor.stack._runtime import Runtime
    from corral.supervisor.stack._settings import Settings

EXIT_NOT_REPLIED = 1
EXIT_CONFIG = 2
"""A bad config, bad input, or an id (conversation, approval, agent) that does not exist."""
EXIT_WAITING = 3
EXIT_NOT_RUNNING = 3
"""``corral status``: no stack runs from this directory (as ``systemctl status``)."""
EXIT_TIMEOUT = 4


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"corral {version('corral')}")
        raise typer.Exit()


app = typer.Typer(
    no_args_is_help=True, rich_markup_mode="markdown", help="corral: run a team of AI agents in production."
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print corral's version and exit."),
    ] = False,
) -> None:
    """corral: run a team of AI agents in production."""


agent_app = typer.Typer(no_args_is_help=True, help="Run one agent as a service.")
supervisor_app = typer.Typer(no_args_is_help=True, help="Run the supervisor as a service.")
app.add_typer(agent_app, name="agent")
app.add_typer(supervisor_app, name="supervisor")
gateway_app = typer.Typer(no_args_is_help=True, help="Run the tool gateway as its own service.")
app.add_typer(gateway_app, name="gateway")
router_app = typer.Typer(no_args_is_help=True, help="Run the model gateway as a service.")
app.add_typer(router_app, name="router")
api_app = typer.Typer(no_args_is_help=True, help="Run the HTTP/SSE API as a service.")
app.add_typer(api_app, name="api")
api_key_app = typer.Typer(no_args_is_help=True, help="Make and revoke the API's keys.")
app.add_typer(api_key_app, name="api-key")
kill_app = typer.Typer(no_args_is_help=True, help="Kill an agent or a conversation (durable).")
revive_app = typer.Typer(no_args_is_help=True, help="Undo `corral kill agent`.")
app.add_typer(kill_app, name="kill")
app.add_typer(revive_app, name="revive")


class _LazyConsole:
    """A rich ``Console`` made when first used (rich costs an import that ``--help`` of a
    command that prints nothing need not pay).

    ``soft_wrap``: a printed line is never wrapped or cut, whatever the width; where the
    output is not a terminal, rich also prints no colour or markup codes.
    """

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, soft_wrap=True)
        return getattr(self._console, name)


console: Any = _LazyConsole(stderr=False)
err_console: Any = _LazyConsole(stderr=True)

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="corral.yaml (default: ./corral.yaml, else the sample team)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document (no colours, no tables)")]
ConversationArgument = Annotated[str, typer.Argument(help="The conversation id (`corral send` prints it)")]


class UnknownIdError(LookupError):
    """A command was given an id (conversation, approval, agent) that does not exist: the
    command exits ``EXIT_CONFIG`` with this message."""


# --- output ---------------------------------------------------------------------------


def print_json(document: object) -> None:
    """``document`` as one JSON document on stdout: no markup, nothing wrapped."""
    sys.stdout.write(json_text(document) + "\n")
    sys.stdout.flush()


def json_text(document: object) -> str:
    """``document`` as indented JSON (datetimes and other values as their ``str``)."""
    import json

    return json.dumps(document, indent=2, default=str, ensure_ascii=False)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None) -> None:
    """A table on stdout: drawn by rich on a terminal; elsewhere (a pipe, a file) plain
    aligned rows under a header line, every value whole, nothing wrapped or cut, so that
    ``corral approvals | cut -d' ' -f1`` gives whole ids."""
    rows = [list(row) for row in rows]
    if is_terminal():
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title)
        for index, column in enumerate(columns):
            # The first column holds the ids: whole on a narrow terminal too.
            table.add_column(column, no_wrap=index == 0)
        for row in rows:
            table.add_row(*(Text(str(cell)) for cell in row))  # values, never markup
        console.print(table)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    for line in (list(columns), *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")
    sys.stdout.flush()


def is_terminal() -> bool:
    """Whether stdout is a terminal (else: no tables drawn, nothing wrapped)."""
    return sys.stdout.isatty()


def say(text: str) -> None:
    """One line on stdout, as written: no markup, no highlighting, never wrapped or cut
    (nor does it load rich)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def complain(text: str) -> None:
    """One line on stderr, as written."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def without_password(url: str) -> str:
    """A NATS URL or a PostgreSQL DSN as it may be shown: its password replaced by ``***``
    (in the address, in a ``password=`` parameter, or in a ``key=value`` DSN); a
    comma-separated list of URLs, each one."""
    import re

    if "," in url and "://" in url.split(",", 1)[1]:
        return ",".join(without_password(part) for part in url.split(","))
    url = re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an address that is not a URL)"
    credentials, at, host = parts.netloc.rpartition("@")
    user, colon, password = credentials.partition(":")
    if not at or not colon or not password:
        return url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def operator_name() -> str:
    """Who runs this command, as kill switches and decisions record it."""
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no USER and no passwd entry (a bare container's uid)
        return f"uid {os.getuid()}"


# --- settings, servers ----------------------------------------------------------------


def _load(config: str | None, *, tools: bool = True) -> Settings:
    """The command's settings: the config ``-c`` names and the environment, read once.

    ``tools=False``: a command that only talks to the team does not import its tools."""
    from corral.supervisor.errors import ConfigError
    from corral.supervisor.stack._settings import Settings

    try:
        return Settings.load(config, check_tools=tools)
    except ConfigError as exc:
        complain(f"config error\n{exc}")
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
    from corral.supervisor.stack._runtime import embedded_database_url

    url = settings.database_url
    if url:
        return url
    _running(settings, "database", "DATABASE_URL")
    embedded = embedded_database_url(settings.state_dir)
    if embedded is None:
        complain(
            f"no database: the stack in {settings.state_dir} uses no embedded PostgreSQL "
            "that this user can reach; set DATABASE_URL"
        )
        raise typer.Exit(1)
    return embedded


def _running(settings: Settings, what: str, variable: str) -> Runtime:
    from corral.supervisor.stack._runtime import Runtime

    runtime = Runtime.read(settings.state_dir)
    if runtime is None:
        complain(f"no {what}: start the team with `corral up` or set {variable}")
        raise typer.Exit(1)
    return runtime


async def _database(settings: Settings) -> Any:
    """One connection to the team's database (the owner's DSN, as every operator command).

    Raises:
        StoreError: PostgreSQL cannot be reached.
    """
    import asyncpg

    from corral.supervisor.errors import StoreError

    url = _database_url(settings)
    try:
        return await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to PostgreSQL at {without_password(url)}: {exc}") from exc


# --- running a command ----------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, int]) -> None:
    """Run a command's coroutine and exit with its code: a ``CorralError`` is printed (exit
    1), an ``UnknownIdError`` too (exit ``EXIT_CONFIG``), never as a traceback."""
    try:
        # uvloop (libuv) where it is installed: the same asyncio, with less overhead per
        # message; the standard loop otherwise (e.g. on Windows).
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(coro)
    except UnknownIdError as exc:
        complain(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        if not _is_ours(exc):
            raise
        complain(f"error: {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


def _is_ours(exc: Exception) -> bool:
    """A ``CorralError``, or PostgreSQL's refusal of a statement: a message, not a traceback.

    Only an error of a loaded module can have been raised: asking this way does not import
    corral.bus (and NATS with it), or asyncpg, into a command that never used them.
    """
    errors = sys.modules.get("corral.bus.errors")
    asyncpg = sys.modules.get("asyncpg")
    return (errors is not None and isinstance(exc, errors.CorralError)) or (
        asyncpg is not None and isinstance(exc, asyncpg.PostgresError)
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


async def _serve(service: Serving) -> None:
    """Run ``service`` until SIGTERM/SIGINT, or until the launcher that started us dies."""
    import signal

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


def _websockets_back() -> None:
    """Give nats-py's transport the aiohttp that a client command imported it without
    (``corral.supervisor.cli._NatsWithoutWebSockets``): the server is a WebSocket URL."""
    import importlib

    from nats.aio import transport

    namespace = vars(transport)  # nats-py does not re-export the name it imported
    if namespace.get("aiohttp") is None:
        namespace["aiohttp"] = importlib.import_module("aiohttp")


async def _connect(settings: Settings, url: str, identity: str, *, forever: bool = True) -> Bus:
    """Connect as ``identity``, with its seed when the server requires identities."""
    from corral.bus import BusConfig, connect
    from corral.bus._telemetry import configure
    from corral.supervisor.stack._runtime import nats_servers

    seed = settings.credentials_for(identity)
    servers = nats_servers(url)
    if any(server.startswith(("ws://", "wss://")) for server in servers):
        _websockets_back()
    bus = await connect(
        BusConfig(
            servers=servers,
            name=f"corral-{identity}",
            identity=identity,
            nkey_seed_file=str(seed) if seed else None,
            reconnect_forever=forever,
        )
    )
    if settings.config.telemetry.enabled:
        configure(bus.js, identity)  # its spans go out on this connection
    return bus

"""``corral up``: embedded servers if none are configured, then the supervisor and one OS
process per agent replica, each restarted with backoff when it dies.

``async with Launcher(config) as launcher:`` starts the stack; ``wait_ready()`` returns once
every process serves; leaving the block stops it and returns once every child process and
embedded server has exited. A watchdog (``supervisor.stack._leftovers``) stops them if the
launcher dies without doing so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from corral.bus import Bus, BusConfig, ControlWatcher, KillSwitch, KillTarget, connect, ensure_topology
from corral.supervisor.errors import LauncherError
from corral.supervisor.stack._children import Children, Launch, RestartPolicy, log_tail
from corral.supervisor.stack._credentials import (
    ADMIN,
    API,
    GATEWAY,
    ROUTER,
    SUPERVISOR,
    Identity,
    agent_identity,
    authorization_block,
    identities,
)
from corral.supervisor.stack._embedded import EmbeddedNats, EmbeddedPostgres
from corral.supervisor.stack._environment import PARENT_PID_ENV, child_environment
from corral.supervisor.stack._leftovers import STOPPED, find_leftovers, stop_leftovers
from corral.supervisor.stack._runtime import ChildInfo, Runtime, embedded_postgres_dir, nats_servers
from corral.supervisor.stack._sandbox import ChildUser, can_read, child_user, config_files
from corral.supervisor.stack._settings import DATABASE_PREPARED_ENV, Settings
from corral.supervisor.stack._specs import child_specs

logger = logging.getLogger(__name__)


__all__ = ["DATABASE_PREPARED_ENV", "PARENT_PID_ENV", "Launcher", "LauncherConfig", "prepare_state_dir"]


@dataclass(frozen=True, kw_only=True)
class LauncherConfig:
    """How ``corral up`` runs the team."""

    settings: Settings
    """The config and the environment, read once (the state directory, the URLs, the seeds)."""
    replicas: dict[str, int]
    """Processes per agent (default: the config's ``replicas``)."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    stable_after_s: float = 30.0
    """A child that ran this long restarts with the initial backoff again."""
    stop_timeout_s: float = 10.0
    start_attempts: int = 3
    """Starts in a row that may end before a child (that never served) serves; then the
    stack stops with the end of its log (see ``supervisor.stack._children``)."""
    ready_timeout_s: float = 120.0
    """How long ``wait_ready()`` waits for every process to serve."""

    @property
    def restart_policy(self) -> RestartPolicy:
        """The children's restarts, as ``Children`` takes them."""
        return RestartPolicy(
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            stable_after_s=self.stable_after_s,
            start_attempts=self.start_attempts,
            stop_timeout_s=self.stop_timeout_s,
        )


def prepare_state_dir(state: Path) -> None:
    """Create the state directory (0700) and its private ``nats/`` and ``logs/``."""
    if not state.exists():
        state.mkdir(parents=True)
        os.chmod(state, 0o700)
    for private in ("nats", "logs"):
        # The JetStream store holds every conversation; the logs name them. The seeds
        # (creds/) and PostgreSQL's directory are private already.
        (state / private).mkdir(exist_ok=True)
        os.chmod(state / private, 0o700)


class Launcher:
    """Start and watch the whole team.

    ``async with Launcher(config) as launcher:`` starts it (``start()``) and watches the
    children in a task of its own; ``wait_ready()`` returns once every process serves;
    ``wait()`` returns once it has stopped (after ``shutdown()``, e.g. on a signal, or when
    a child cannot be started or keeps failing at start: ``failure`` says why), and leaving
    the block stops everything and waits until every child has exited. ``start()``,
    ``run()`` and ``shutdown()`` remain for a caller that drives it itself.

    Args:
        config: What to start.
    """

    def __init__(self, config: LauncherConfig) -> None:
        self._config = config
        self._settings = config.settings
        self._nats: EmbeddedNats | None = None
        self._postgres: EmbeddedPostgres | None = None
        self._stopping = asyncio.Event()
        self._children = Children(config.restart_policy, self._stopping, self._write_runtime)
        self._tasks: list[asyncio.Task[None]] = []
        """The control watcher's."""
        self._runner: asyncio.Task[None] | None = None
        self.runtime: Runtime | None = None
        self._identities: list[Identity] = []
        self._admin: Bus | None = None
        self._control: ControlWatcher | None = None
        self._revoked: set[str] = set()
        self._service_dsn: str | None = None
        """What the supervisor (and a separate gateway) connect with; never in runtime.json."""
        self._watchdog: asyncio.subprocess.Process | None = None

    @property
    def revoked(self) -> list[str]:
        """The agents whose identity is revoked at the broker (``corral kill agent``): their
        processes run, but cannot connect."""
        return sorted(self._revoked)

    @property
    def stopping(self) -> bool:
        """Whether the stack is stopping (``shutdown()``, or by itself: see ``failure``)."""
        return self._stopping.is_set()

    @property
    def failure(self) -> LauncherError | None:
        """Why the stack stopped by itself: a child that could not be started, or kept
        failing at start (with the end of its log); None otherwise."""
        return self._children.failure

    async def __aenter__(self) -> Launcher:
        """Start the stack (see ``start()``) and watch it until the block is left.

        Raises:
            LauncherError: as ``start()``; what it had started is stopped first.
        """
        try:
            await self.start()
        except BaseException:
            await self._stop_everything()
            raise
        self._runner = asyncio.create_task(self.run(), name="launcher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every child, then the servers; return once all of them have exited."""
        await self.shutdown()
        await self.wait()

    async def wait(self) -> None:
        """Return once the stack entered with ``async with`` has stopped: after ``shutdown()``,
        or when a child could not be started (which stops everything; ``failure`` says why)."""
        if self._runner is not None:
            await asyncio.shield(self._runner)

    async def wait_ready(
        self,
        on_ready: Callable[[ChildInfo, float], None] | None = None,
        on_waiting: Callable[[list[ChildInfo], float], None] | None = None,
        *,
        every_s: float = 10.0,
    ) -> None:
        """Return once every child serves (said so on its readiness pipe), except agents
        revoked at the broker (``corral kill agent``), which cannot.

        Args:
            on_ready: Told of each child as it first serves, with the seconds since this call.
            on_waiting: Told every ``every_s`` of the children not serving yet.
            every_s: How often ``on_waiting`` is told.

        Raises:
            LauncherError: the stack stopped (``failure``: a child kept failing at start),
                or a child did not serve within ``ready_timeout_s`` (the end of its log).
        """
        children, began = self._children, time.monotonic()
        deadline, told = began + self._config.ready_timeout_s, set[str]()
        next_tell = began + every_s
        while True:
            children.changed.clear()
            if children.failure is not None:
                raise children.failure
            if self._stopping.is_set():
                raise LauncherError("corral stopped before every process served")
            for info in children.infos:
                if info.ready and info.name not in told:
                    told.add(info.name)
                    if on_ready is not None:
                        on_ready(info, time.monotonic() - began)
            waiting = [c for c in children.infos if c.name not in told and c.role not in self._revoked]
            now = time.monotonic()
            if not waiting:
                return
            if now >= deadline:
                raise self._not_ready(waiting)
            if now >= next_tell:
                next_tell = now + every_s
                if on_waiting is not None:
                    on_waiting(waiting, now - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(children.changed.wait(), min(deadline, next_tell) - now)

    def _not_ready(self, waiting: list[ChildInfo]) -> LauncherError:
        logs = self._settings.state_dir / "logs"
        parts = [
            f"not serving after {self._config.ready_timeout_s:.0f}s: {', '.join(c.name for c in waiting)}"
        ]
        for info in waiting:
            tail = log_tail(logs / f"{info.name}.log", lines=5)
            parts.append(f"the end of {logs / f'{info.name}.log'}:")
            parts += [f"    {line}" for line in tail] or ["    (empty)"]
        return LauncherError("\n".join(parts))

    async def start(self) -> Runtime:
        """Start servers (embedded unless configured), set up streams, spawn children.

        Raises:
            LauncherError: if a server cannot start or a stack already runs here.
        """
        state = self._settings.state_dir
        existing = Runtime.read(state)
        if existing is not None and existing.pid != os.getpid():
            raise LauncherError(
                f"corral is already running from {state} (pid {existing.pid}); stop it with `corral down`"
            )
        settings = self._settings
        loaded = settings.loaded
        prepare_state_dir(state)
        await self._start_watchdog()
        nats_url = settings.nats_url
        if nats_url is None:
            # The embedded server requires an identity of every connection, with
            # permissions compiled from the graph; agents killed earlier stay revoked.
            self._identities = identities(loaded, settings.creds_dir)
            self._nats = EmbeddedNats(state / "nats", monitor_port=settings.monitor_port)
            self._nats.stop_stale()
            self._nats.write_config(authorization_block(self._identities, self._revoked_cache()))
            await asyncio.to_thread(self._nats.start)
            nats_url = self._nats.url
            logger.info("embedded nats-server (JetStream, sync always, nkey identities) at %s", nats_url)
        database_url = settings.database_url
        if database_url is None:
            self._postgres = EmbeddedPostgres(embedded_postgres_dir(state))
            database_url = await asyncio.to_thread(self._postgres.start)
            logger.info("embedded PostgreSQL in %s", embedded_postgres_dir(state))
        self._service_dsn = await self._prepare_database(database_url)
        seed = settings.credentials_for(ADMIN)
        self._admin = await connect(
            BusConfig(
                servers=nats_servers(nats_url),
                name="corral-up",
                identity=ADMIN,
                nkey_seed_file=str(seed) if seed else None,
            )
        )
        await ensure_topology(self._admin.js, loaded.agent_names, settings.topology)
        if self._nats is not None:
            self._control = ControlWatcher(self._admin.js, self._on_control, keys="agent.>")
            self._tasks.append(asyncio.create_task(self._control.run(), name="control"))
        self.runtime = Runtime(
            pid=os.getpid(),
            nats_url=nats_url,
            embedded_nats=self._nats is not None,
            embedded_postgres=self._postgres is not None,
            nats_monitor_url=self._nats.monitor_url if self._nats else None,
            nats_pid=self._nats.pid if self._nats else None,
            postgres_pid=self._postgres.pid if self._postgres else None,
            watchdog_pid=self._watchdog.pid if self._watchdog else None,
        )
        self._spawn_all()
        return self.runtime

    async def _start_watchdog(self) -> None:
        """Start the process that stops what this launcher leaves running if it dies
        without stopping it (SIGKILL); first stop what an earlier one left."""
        state = self._settings.state_dir
        leftovers = await asyncio.to_thread(find_leftovers, state)
        if leftovers:
            logger.warning(
                "stopping what an earlier corral up left running: %s", ", ".join(map(str, leftovers))
            )
            await asyncio.to_thread(stop_leftovers, leftovers)
        with open(state / "logs" / "watchdog.log", "ab") as log:  # noqa: ASYNC230 - a local append
            self._watchdog = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.supervisor.stack._leftovers",
                str(state),
                stdin=asyncio.subprocess.PIPE,
                stdout=log,
                stderr=log,
                start_new_session=True,  # neither Ctrl-C nor the terminal's hangup reach it
            )

    async def _stop_watchdog(self) -> None:
        """Tell the watchdog everything is stopped, and wait for it to exit."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(STOPPED)
            await watchdog.stdin.drain()
        watchdog.stdin.close()
        try:
            await asyncio.wait_for(watchdog.wait(), 10)
        except TimeoutError:
            watchdog.kill()
            await watchdog.wait()

    async def _prepare_database(self, owner_dsn: str) -> str:
        """Migrate as the owner, then choose the DSN the services connect with: the
        configured supervisor DSN, else ``corral_supervisor`` with a fresh password; the
        owner's own only if that role cannot serve (a warning says why)."""
        from corral.supervisor.store._roles import (
            SUPERVISOR_ROLE,
            can_serve,
            prepare_database,
            supervisor_login,
        )

        tools = self._settings.loaded.config.tools
        module = tools.reference if tools is not None else None
        await prepare_database(owner_dsn, module)
        configured = self._settings.supervisor_database_url
        if configured is not None:
            return configured
        derived = await supervisor_login(owner_dsn)
        if derived is None:
            logger.warning("the supervisor connects as the database's owner: set database.supervisor_url")
            return owner_dsn
        problem = await can_serve(derived, None)
        if problem is not None:
            logger.warning(
                "the supervisor connects as the database's owner, not %s: %s", SUPERVISOR_ROLE, problem
            )
            return owner_dsn
        logger.info("the supervisor connects as %s", SUPERVISOR_ROLE)
        return derived

    def _revoked_cache(self) -> set[str]:
        """Agents revoked when the launcher last ran (the KV is read once NATS is up)."""
        try:
            self._revoked = set(json.loads((self._settings.state_dir / "revoked.json").read_text()))
        except (OSError, ValueError):
            self._revoked = set()
        return self._revoked

    async def _on_control(self, target: KillTarget, name: str, switch: KillSwitch | None) -> None:
        """Revoke or restore an agent's identity at the broker: rewrite and reload."""
        revoked = self._revoked | {name} if switch else self._revoked - {name}
        if target != "agent" or revoked == self._revoked or self._nats is None:
            return
        self._revoked = revoked
        (self._settings.state_dir / "revoked.json").write_text(json.dumps(sorted(revoked)))
        self._nats.write_config(authorization_block(self._identities, revoked))
        self._nats.reload()
        self._children.changed.set()  # wait_ready no longer waits for a revoked agent
        logger.warning("agent %s %s at the broker", name, "revoked" if switch else "restored")

    def _spawn_all(self) -> None:
        specs = child_specs(self._settings.loaded, self._config.replicas, self._settings.api_port)
        assert self.runtime is not None  # the servers started
        self.runtime.api_url = specs.api_url
        for info, argv in specs.children:
            self._children.watch(info, functools.partial(self._watch, info, argv))
        self._write_runtime()

    async def run(self) -> None:
        """Watch children until ``shutdown()``; then stop children, then servers."""
        try:
            await self._stopping.wait()
        finally:
            await self._stop_everything()

    async def shutdown(self) -> None:
        """Ask ``run()`` to stop everything; idempotent."""
        self._stopping.set()

    async def _watch(self, info: ChildInfo, argv: list[str]) -> None:
        assert self.runtime is not None
        trusted = info.role in (SUPERVISOR, GATEWAY, ROUTER)
        # The API is corral's own code but holds no database credentials, as an agent.
        api = info.role == API
        identity = info.role if trusted or api else agent_identity(info.role)
        seed = self._settings.credentials_for(identity)
        env = child_environment(
            os.environ,
            trusted=trusted,
            nats_url=self.runtime.nats_url,
            state_dir=self._settings.state_dir,
            parent_pid=os.getpid(),
            seed=seed,
            service_dsn=self._service_dsn,
        )
        sandbox: ChildUser | None = None
        if not trusted and not api and os.geteuid() == 0:
            # As root, an agent runs as a user of its own, which can read no seed on disk: it
            # gets its own through an inherited memory file (see supervisor.stack._sandbox).
            sandbox = await asyncio.to_thread(child_user, identity, seed)
            if await asyncio.to_thread(can_read, sandbox, self._agent_files(info.role)):
                env.update(sandbox.env)
                info.uid = sandbox.uid
            else:
                logger.warning(
                    "%s runs as root: its user %s cannot read %s (make the config's directory "
                    "readable by others to run agents unprivileged)",
                    info.name,
                    sandbox.env.get("USER"),
                    self._settings.loaded.path,
                )
                sandbox.close()
                sandbox = None
        logs = self._settings.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "corral.supervisor", *argv]
        launch = Launch(
            command=sandbox.argv(command) if sandbox is not None else command,
            env=env,
            log=logs / f"{info.name}.log",
            popen_kwargs=sandbox.popen_kwargs() if sandbox is not None else {},
        )
        try:
            await self._children.keep_running(info, launch, lambda: info.role in self._revoked)
        except Exception as exc:
            # A child that cannot even be started stops the whole stack, loudly.
            logger.exception("cannot run %s; stopping corral", info.name)
            self._children.fail(LauncherError(f"cannot run {info.name}: {exc}"))
            raise
        finally:
            if sandbox is not None:
                sandbox.close()

    def _agent_files(self, agent: str) -> list[Path]:
        """What an agent process reads at start: the config and the files it names."""
        loaded = self._settings.loaded
        named = [*loaded.config.scripted.values(), loaded.config.agents[agent].instructions]
        return config_files(loaded.path.resolve(), named)

    def _write_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.children = self._children.infos
            self.runtime.write(self._settings.state_dir)

    async def _stop_everything(self) -> None:
        self._stopping.set()
        await self._children.stop()
        if self._control is not None:
            await self._control.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()
        if self._nats is not None:
            await asyncio.to_thread(self._nats.stop)
        if self._postgres is not None:
            await asyncio.to_thread(self._postgres.stop)
        if self.runtime is not None:
            # Only a stack that got as far as running removes runtime.json: a start refused
            # because another stack runs here leaves that stack's file alone.
            with contextlib.suppress(OSError):
                (self._settings.state_dir / "runtime.json").unlink()
        await self._stop_watchdog()
        logger.info("corral stopped")

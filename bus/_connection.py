"""Connecting to NATS and translating its failures into ``BusError``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus import subjects
from bus.errors import BusConnectError

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


@dataclass(frozen=True)
class Bus:
    """An open NATS connection and its JetStream context."""

    nc: Client
    js: JetStreamContext

    async def close(self) -> None:
        """Drain subscriptions and close the connection; safe to call twice."""
        if self.nc.is_closed:
            return
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

    async def _on_error(exc: Exception) -> None:
        logger.warning("NATS connection %s: %s", config.name, exc)

    async def _on_disconnect() -> None:
        logger.info("NATS connection %s lost; reconnecting", config.name)

    async def _on_reconnect() -> None:
        logger.info("NATS connection %s restored", config.name)

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
        )
    except Exception as exc:
        raise BusConnectError(
            f"cannot connect to NATS at {', '.join(config.servers)}: {exc}", retryable=True
        ) from exc
    return Bus(nc=nc, js=nc.jetstream())

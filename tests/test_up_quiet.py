"""The bus's connection log stays quiet: a refused reconnect (a killed agent's revoked
identity) is logged once, not on every attempt; closing a connection logs no loss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.bus import Bus, BusConfig, connect
from corral.supervisor import load_config
from corral.supervisor.stack._credentials import agent_identity, authorization_block, identities
from corral.supervisor.stack._embedded import EmbeddedNats
from tests.conftest import SAMPLE_CONFIG, eventually


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("corral.bus._connection")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


async def test_a_revoked_identity_is_refused_in_the_log_once_not_per_reconnect(
    tmp_path: Path, records: _Records
) -> None:
    loaded = load_config(SAMPLE_CONFIG)
    ids = identities(loaded, tmp_path / "creds")
    server = EmbeddedNats(tmp_path / "nats")
    server.write_config(authorization_block(ids))
    server.start()
    try:
        seed = tmp_path / "creds" / f"{agent_identity('payments')}.nk"
        bus = await connect(
            BusConfig(
                servers=[server.url],
                name="payments-test",
                identity=agent_identity("payments"),
                nkey_seed_file=str(seed),
            )
        )
        try:
            # `corral kill agent payments`: the broker's config loses its identity.
            server.write_config(authorization_block(ids, ["payments"]))
            server.reload()
            # nats-py retries every 0.5 s; wait for several refusals to have happened.
            await eventually(
                lambda: any("(again, 3)" in m for m in records.messages(logging.DEBUG)),
                timeout=30,
                message="three refused reconnects",
            )
            refused = [m for m in records.messages(logging.WARNING) if "Authorization Violation" in m]
            assert len(refused) == 1, records.messages(logging.WARNING)
            # Restored: the connection comes back, and says how often it was refused.
            server.write_config(authorization_block(ids))
            server.reload()
            await eventually(lambda: bus.nc.is_connected, timeout=30, message="reconnected")
            await eventually(
                lambda: any("restored" in m for m in records.messages(logging.INFO)),
                message="the restore logged",
            )
            restored = next(m for m in records.messages(logging.INFO) if "restored" in m)
            assert "Authorization Violation" in restored, restored  # with how often it was refused
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_a_revoked_identity_at_start_is_refused_in_the_log_once(
    tmp_path: Path, records: _Records
) -> None:
    """An agent killed before `corral up` starts it: the first connect is refused on every
    attempt, and that too is logged once."""
    loaded = load_config(SAMPLE_CONFIG)
    ids = identities(loaded, tmp_path / "creds")
    server = EmbeddedNats(tmp_path / "nats")
    server.write_config(authorization_block(ids, ["payments"]))
    server.start()
    try:
        seed = tmp_path / "creds" / f"{agent_identity('payments')}.nk"
        config = BusConfig(
            servers=[server.url],
            name="payments-test",
            identity=agent_identity("payments"),
            nkey_seed_file=str(seed),
        )
        connecting = asyncio.create_task(connect(config))
        try:
            await eventually(
                lambda: any("(again, 3)" in m for m in records.messages(logging.DEBUG)),
                timeout=30,
                message="three refused connects",
            )
            refused = [m for m in records.messages(logging.WARNING) if "Authorization Violation" in m]
            assert len(refused) == 1, records.messages(logging.WARNING)
            assert not connecting.done()  # nats-py keeps trying: the agent stays, refused
        finally:
            connecting.cancel()
            outcome = (await asyncio.gather(connecting, return_exceptions=True))[0]
            if isinstance(outcome, Bus):
                await outcome.close()
    finally:
        server.stop()


async def test_closing_a_connection_logs_no_loss(nats_server: EmbeddedNats, records: _Records) -> None:
    bus = await connect(BusConfig(servers=[nats_server.url], name="closing-test"))
    await bus.close()
    await eventually(lambda: bus.nc.is_closed, message="closed")
    logged = [r.getMessage() for r in records.records if r.levelno >= logging.INFO]
    assert not any("lost" in m or "closed for good" in m for m in logged), logged

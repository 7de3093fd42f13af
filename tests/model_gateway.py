"""The model gateway for tests that run an agent in-process and play the supervisor by
hand: the real ``ModelGateway`` on the test's nats-server, answering from the given models,
with a ledger that admits every call and journals nothing (those tests have no database;
the tests that do use ``supervisor.store.ModelLedger``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from corral.agents import AgentSettings, offered_tools
from corral.bus import Bus, BusConfig, JournalEntry, ModelCall, connect
from corral.router import Admission, Model, ModelGateway
from corral.supervisor import EmbeddedNats


class AdmitAll:
    """A ledger for tests without a database: every call may be made, nothing is kept."""

    def __init__(self) -> None:
        self.recorded: list[JournalEntry] = []

    async def admit(self, call: ModelCall, sender: str) -> Admission:
        return Admission()

    async def record(self, entry: JournalEntry) -> JournalEntry | None:
        self.recorded.append(entry)
        return entry


@asynccontextmanager
async def model_gateway(
    nats_server: EmbeddedNats, models: Mapping[str, Model], agents: list[AgentSettings]
) -> AsyncIterator[AdmitAll]:
    """Serve ``models`` (by tier) to ``agents`` until the block ends; yields the ledger."""
    bus: Bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    ledger = AdmitAll()
    tiers = frozenset(models)
    offers = {agent.name: offered_tools(agent) for agent in agents}
    try:
        async with ModelGateway(bus.nc, models, ledger, dict.fromkeys(offers, tiers), offers):
            yield ledger
    finally:
        await bus.close()

"""`corral supervisor run`, `corral gateway run`, `corral agent run`: the services."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import typer

from corral.bus import (
    Bus,
    Serving,
    subjects,
)
from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    _connect,
    _database_url,
    _load,
    _nats_url,
    _run,
    _serve,
    _setup_logging,
    agent_app,
    err_console,
    gateway_app,
    supervisor_app,
)
from corral.supervisor.config._config import LoadedConfig
from corral.supervisor.stack._credentials import GATEWAY, SUPERVISOR, agent_identity
from corral.supervisor.stack._runtime import (
    credentials_for,
    topology,
)

# --- services -------------------------------------------------------------------------


@supervisor_app.command("run")
def supervisor_run(config: ConfigOption = None) -> None:
    """Run the supervisor: enforce the handoff graph and record conversations."""
    loaded = _load(config)
    _setup_logging()

    async def _main() -> int:
        from corral.bus import MaxDeliveriesWatcher, ensure_topology
        from corral.supervisor.audit._anchors import AuditAnchorer
        from corral.supervisor.core._decide import Graph
        from corral.supervisor.core._supervisor import Supervisor
        from corral.supervisor.store._budgets import Budgets
        from corral.supervisor.store._journal import JournalService
        from corral.supervisor.store._store import Store

        bus = await _connect(loaded, _nats_url(loaded), SUPERVISOR)
        store = await Store.open(_database_url(loaded))
        try:
            await ensure_topology(bus.js, loaded.agent_names, topology(loaded))
            graph = Graph(
                entry=loaded.config.graph.entry,
                edges={k: list(v) for k, v in loaded.config.graph.edges.items()},
                min_confidence=loaded.config.graph.min_confidence,
                max_steps=loaded.config.conversation.max_steps,
                max_pingpong=loaded.config.conversation.max_pingpong,
            )
            supervisor = Supervisor(
                bus,
                store,
                graph,
                budgets=Budgets.from_config(loaded),
                max_deliver=loaded.config.nats.max_deliver,
                limits=loaded.config.limits.to_limits(),
            )
            services: list[Serving] = [
                supervisor,
                JournalService(bus.nc, store.pool, Budgets.from_config(loaded), on_over=supervisor.republish),
                MaxDeliveriesWatcher(bus.nc, bus.js, subjects.WORK_STREAM, supervisor.dead_step),
            ]
            if loaded.config.tools is not None and not loaded.config.tools.separate_gateway:
                services.append(await _gateway(loaded, bus, store))
            seed = credentials_for(loaded, SUPERVISOR)
            if seed is None:
                await _serve(_Together(services))
            else:
                # Anchors of the audit chain: one at start before anything appends, one per
                # interval, and one at shutdown once every service has stopped.
                async with AuditAnchorer(
                    bus.js,
                    store.pool,
                    seed,
                    interval_s=loaded.config.audit.anchor_interval_s,
                    replicas=topology(loaded).replicas,
                ) as anchorer:
                    await _serve(_Together([*services, anchorer]))
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())


async def _gateway(loaded: LoadedConfig, bus: Bus, store: Any) -> Serving:
    """The tool gateway of ``loaded``'s tools, with its backend prepared."""
    from datetime import timedelta

    from corral.supervisor.config._config import load_tools
    from corral.supervisor.config._tools_module import import_tools
    from corral.supervisor.gateway._gateway import GatewayConfig, ToolGateway
    from corral.supervisor.gateway._policy import PolicyEngine
    from corral.supervisor.stack._launcher import DATABASE_PREPARED_ENV
    from corral.supervisor.store._agent_controls import ensure_agent_controls
    from corral.supervisor.store._budgets import Budgets
    from corral.supervisor.store._roles import grant_tool_role

    tools_section = loaded.config.tools
    assert tools_section is not None and loaded.policies_dir is not None
    module = import_tools(tools_section.reference)
    setup = getattr(module, "setup", None)
    # Under `corral up` the owner ran the tools' setup and granted corral_tools their schemas
    # (supervisor.store._roles.prepare_database): the service, connected as corral_supervisor,
    # runs no DDL.
    prepared = os.environ.get(DATABASE_PREPARED_ENV) == "1"
    async with store.pool.acquire() as conn:
        if setup is not None and not prepared:
            await setup(conn)
        if not prepared:
            # Tool statements run as corral_tools: it reaches the schemas the module declares.
            await grant_tool_role(conn, getattr(module, "SCHEMAS", ()))
        # Every agent has a kill row before its first call (a kill waits on it).
        await ensure_agent_controls(conn, loaded.agent_names)
    agents = loaded.config.agents
    return ToolGateway(
        bus.nc,
        store.pool,
        load_tools(loaded.config).values(),
        PolicyEngine.load(loaded.policies_dir),
        GatewayConfig(
            budgets=Budgets.from_config(loaded),
            approval_ttl=timedelta(seconds=tools_section.approval_ttl_s),
            max_pending_approvals=tools_section.max_pending_approvals,
            grants={name: frozenset(agent.tools) for name, agent in agents.items()},
            max_calls_per_step={name: agent.max_tool_calls for name, agent in agents.items()},
            call_timeout_s=tools_section.call_timeout_s,
            limits=loaded.config.limits.to_limits(),
        ),
    )


class _Together:
    """Several services as one: run all, stop all when one stops."""

    def __init__(self, services: list[Serving]) -> None:
        self._services = services

    async def run(self) -> None:
        tasks = [asyncio.create_task(s.run()) for s in self._services]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            await self.shutdown()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        for service in self._services:
            await service.shutdown()


@gateway_app.command("run")
def gateway_run(config: ConfigOption = None) -> None:
    """Run the tool gateway alone (several may run: they share the work)."""
    loaded = _load(config)
    if loaded.config.tools is None:
        err_console.print(f"{loaded.path} configures no tools")
        raise typer.Exit(EXIT_CONFIG)
    _setup_logging()

    async def _main() -> int:
        from corral.bus import ConnectionGuard
        from corral.supervisor.store._store import Store

        bus = await _connect(loaded, _nats_url(loaded), GATEWAY)
        store = await Store.open(_database_url(loaded))
        try:
            # A connection closed for good ends the process (so whatever started it restarts it).
            await _serve(_Together([await _gateway(loaded, bus, store), ConnectionGuard(bus)]))
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())


@agent_app.command("run")
def agent_run(
    name: Annotated[str, typer.Argument(help="The agent to run")], config: ConfigOption = None
) -> None:
    """Run one agent: consume its inbox, call its model, propose handoffs or reply."""
    loaded = _load(config)
    if name not in loaded.config.agents:
        err_console.print(f"unknown agent {name!r}; {loaded.path} defines: {', '.join(loaded.agent_names)}")
        raise typer.Exit(EXIT_CONFIG)
    _setup_logging()

    async def _main() -> int:
        from corral.agents import AgentService, AgentSettings
        from corral.router import model_for_tier
        from corral.supervisor.config._config import load_tools

        model = model_for_tier(loaded.tier(name), loaded.scripted_rules)
        bus = await _connect(loaded, _nats_url(loaded), agent_identity(name))
        try:
            tools = load_tools(loaded.config)
            offered = [
                {"name": t, "description": tools[t].description, "schema": tools[t].schema()}
                for t in loaded.config.agents[name].tools
            ]
            settings = AgentSettings(
                tools=offered,
                name=name,
                instructions=loaded.instructions[name],
                handoff_targets=loaded.targets(name),
                heartbeat_s=loaded.config.nats.ack_wait_s / 3,
                max_tool_calls=loaded.config.agents[name].max_tool_calls,
                max_deliver=loaded.config.nats.max_deliver,
                limits=loaded.config.limits.to_limits(),
            )
            await _serve(AgentService(settings, bus, model))
        finally:
            await bus.close()
        return 0

    _run(_main())

"""`corral supervisor run`, `corral gateway run`, `corral agent run`: the services."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
    router_app,
    supervisor_app,
)

if TYPE_CHECKING:
    # What a service runs is imported when it runs: `corral --help` loads none of it.
    from corral.bus import Bus, Serving
    from corral.supervisor.stack._settings import Settings

# --- services -------------------------------------------------------------------------


@supervisor_app.command("run")
def supervisor_run(config: ConfigOption = None) -> None:
    """Run the supervisor: enforce the handoff graph and record conversations."""
    settings = _load(config)
    _setup_logging()

    async def _main() -> int:
        from corral.bus import MaxDeliveriesWatcher, ensure_topology, subjects
        from corral.supervisor.audit._anchors import AuditAnchorer
        from corral.supervisor.core._api_desk import ApiDesk
        from corral.supervisor.core._human_desk import HumanDesk
        from corral.supervisor.core._supervisor import Supervisor
        from corral.supervisor.stack._credentials import ADMIN, API, SUPERVISOR
        from corral.supervisor.stack._readiness import announced
        from corral.supervisor.store._journal import JournalService
        from corral.supervisor.store._store import Store

        tools = settings.config.tools
        bus = await _connect(settings, _nats_url(settings), SUPERVISOR)
        store = await Store.open(_database_url(settings))
        try:
            await ensure_topology(bus.js, settings.loaded.agent_names, settings.topology)
            supervisor = Supervisor(
                bus,
                store,
                settings.graph,
                budgets=settings.budgets,
                max_deliver=settings.config.nats.max_deliver,
                limits=settings.limits,
            )
            desk = HumanDesk(
                bus.nc,
                store.pool,
                supervisor.act,
                settings.graph,
                lambda: supervisor.killed_agents,
                operator_identities=(ADMIN, API),
                claim_ttl_s=settings.config.queue.claim_ttl_s,
                approvers=tools.approvers if tools is not None else {},
                agents=settings.loaded.agent_names,
                customer_identities=(API,),
            )
            services: list[Serving] = [
                supervisor,
                desk,
                ApiDesk(bus.nc, store.pool, api_identity=API),
                JournalService(bus.nc, store.pool, settings.budgets, on_over=supervisor.republish),
                MaxDeliveriesWatcher(bus.nc, bus.js, subjects.WORK_STREAM, supervisor.dead_step),
            ]
            if tools is not None and not tools.separate_gateway:
                services.append(await _gateway(settings, bus, store))
            services += _watchers(settings, bus, store)
            seed = settings.credentials_for(SUPERVISOR)
            if seed is None:
                await _serve(announced(_Together(services)))
            else:
                # Anchors of the audit chain: one at start before anything appends, one per
                # interval, and one at shutdown once every service has stopped.
                async with AuditAnchorer(
                    bus.js,
                    store.pool,
                    seed,
                    interval_s=settings.config.audit.anchor_interval_s,
                    replicas=settings.topology.replicas,
                ) as anchorer:
                    await _serve(announced(_Together([*services, anchorer])))
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())


def _watchers(settings: Settings, bus: Bus, store: Any) -> list[Serving]:
    """The supervisor's watchers: the alert keeper, the anomaly watch (unless alerts are off)
    and the span writer (unless telemetry is off)."""
    from datetime import timedelta

    from corral.supervisor.core._alert_keeper import AlertKeeper
    from corral.supervisor.core._alert_watch import AnomalyWatch
    from corral.supervisor.store._spans import SpanWriter

    alerts = settings.config.alerts
    watchers: list[Serving] = [AlertKeeper(bus.js, store.pool, alerts, settings.loaded.agent_names)]
    if alerts.enabled:
        watchers.append(AnomalyWatch(bus.nc, store.pool, alerts))
    telemetry = settings.config.telemetry
    if telemetry.enabled:
        retention = timedelta(hours=telemetry.retention_hours) if telemetry.store else None
        watchers.append(SpanWriter(bus.js, store.pool, retention=retention))
    return watchers


async def _gateway(settings: Settings, bus: Bus, store: Any) -> Serving:
    """The tool gateway of the team's tools, with its backend prepared."""
    from corral.supervisor.config._tools_module import import_tools
    from corral.supervisor.gateway._gateway import ToolGateway
    from corral.supervisor.stack._validate import policy_engine
    from corral.supervisor.store._agent_controls import ensure_agent_controls
    from corral.supervisor.store._roles import grant_tool_role

    tools_section = settings.config.tools
    policies_dir = settings.loaded.policies_dir
    assert tools_section is not None and policies_dir is not None
    module = import_tools(tools_section.reference)
    setup = getattr(module, "setup", None)
    # Under `corral up` the owner ran the tools' setup and granted corral_tools their schemas
    # (supervisor.store._roles.prepare_database): the service, connected as corral_supervisor,
    # runs no DDL.
    prepared = settings.database_prepared
    async with store.pool.acquire() as conn:
        if setup is not None and not prepared:
            await setup(conn)
        if not prepared:
            # Tool statements run as corral_tools: it reaches the schemas the module declares.
            await grant_tool_role(conn, getattr(module, "SCHEMAS", ()))
        # Every agent has a kill row before its first call (a kill waits on it).
        await ensure_agent_controls(conn, settings.loaded.agent_names)
    return ToolGateway(
        bus.nc,
        store.pool,
        settings.tools.values(),
        policy_engine(settings),
        settings.gateway_config,
    )


class _Together:
    """Several services as one: run all, stop all when one stops."""

    def __init__(self, services: list[Serving]) -> None:
        self._services = services

    async def run(self) -> None:
        from corral.bus import serve_together

        await serve_together(*self._services)

    async def shutdown(self) -> None:
        # All told at once: each waits for its service, their grace periods overlap.
        await asyncio.gather(*(service.shutdown() for service in self._services))

    async def wait_started(self) -> None:
        # Serving once every part that says when it serves does (or has stopped).
        from corral.bus import Service

        await asyncio.gather(*(s.wait_started() for s in self._services if isinstance(s, Service)))


@gateway_app.command("run")
def gateway_run(config: ConfigOption = None) -> None:
    """Run the tool gateway alone (several may run: they share the work)."""
    settings = _load(config)
    if settings.config.tools is None:
        err_console.print(f"{settings.path} configures no tools")
        raise typer.Exit(EXIT_CONFIG)
    _setup_logging()

    async def _main() -> int:
        from corral.bus import ConnectionGuard
        from corral.supervisor.stack._credentials import GATEWAY
        from corral.supervisor.stack._readiness import announced
        from corral.supervisor.store._store import Store

        bus = await _connect(settings, _nats_url(settings), GATEWAY)
        store = await Store.open(_database_url(settings))
        try:
            # A connection closed for good ends the process (so whatever started it restarts it).
            await _serve(announced(_Together([await _gateway(settings, bus, store), ConnectionGuard(bus)])))
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())


@agent_app.command("run")
def agent_run(
    name: Annotated[str, typer.Argument(help="The agent to run")], config: ConfigOption = None
) -> None:
    """Run one agent: consume its inbox, ask the model gateway, propose handoffs or reply."""
    settings = _load(config)
    if name not in settings.config.agents:
        defined = ", ".join(settings.loaded.agent_names)
        err_console.print(f"unknown agent {name!r}; {settings.path} defines: {defined}")
        raise typer.Exit(EXIT_CONFIG)
    _setup_logging()

    async def _main() -> int:
        from corral.agents import AgentService
        from corral.supervisor.stack._credentials import agent_identity
        from corral.supervisor.stack._readiness import announced

        bus = await _connect(settings, _nats_url(settings), agent_identity(name))
        try:
            await _serve(announced(AgentService(settings.agent_settings(name), bus)))
        finally:
            await bus.close()
        return 0

    _run(_main())


@router_app.command("run")
def router_run(config: ConfigOption = None) -> None:
    """Run the model gateway: every model call of the team (several may run: they share
    the work)."""
    settings = _load(config)
    from corral.supervisor.stack._validate import model_key_problem

    for tier in settings.model_tiers():
        problem = model_key_problem(settings, tier)
        if problem is not None:
            # A tier that cannot be called fails every step; say why now, not as a timeout.
            err_console.print(f"the model gateway cannot start: {problem}", highlight=False)
            raise typer.Exit(EXIT_CONFIG)
    _setup_logging()

    async def _main() -> int:
        from corral.agents import offered_tools
        from corral.bus import ConnectionGuard
        from corral.router import ModelGateway, model_for_tier
        from corral.supervisor.core._alert_watch import retry_storm_observer
        from corral.supervisor.stack._credentials import ROUTER
        from corral.supervisor.stack._readiness import announced
        from corral.supervisor.store._model_ledger import ModelLedger
        from corral.supervisor.store._store import Store

        rules = settings.loaded.scripted_rules
        models = {name: model_for_tier(tier, rules) for name, tier in settings.model_tiers().items()}
        bus = await _connect(settings, _nats_url(settings), ROUTER)
        # The journal's commits do not wait for their WAL flush: anything an answer causes
        # (a tool's effect, the supervisor's decision) commits synchronously after it, and
        # PostgreSQL flushes the WAL in order, so a journaled answer is durable before
        # anything it caused is. A crash of PostgreSQL loses only answers nothing acted on
        # yet (the step asks again). See store._model_ledger.
        store = await Store.open(
            _database_url(settings), max_size=20, server_settings={"synchronous_commit": "off"}
        )
        try:
            agents = settings.loaded.agent_names
            offers = {name: offered_tools(settings.agent_settings(name)) for name in agents}
            ledger = ModelLedger(store.pool, settings.budgets)
            alerts = settings.config.alerts
            storms = retry_storm_observer(bus.nc, alerts) if alerts.enabled else None
            gateway = ModelGateway(bus.nc, models, ledger, settings.tiers_of(), offers, on_attempts=storms)
            try:
                await _serve(announced(_Together([gateway, ConnectionGuard(bus)])))
            finally:
                await ledger.close()
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())

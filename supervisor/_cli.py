"""The ``corral`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
import yaml
from rich.console import Console

from bus import (
    Bus,
    BusConfig,
    BusError,
    ClientUpdate,
    ConversationEnded,
    ConversationWaiting,
    CorralError,
    KillTarget,
    ToolDecided,
    clear_kill,
    connect,
    list_kills,
    set_kill,
    subjects,
)
from supervisor._config import LoadedConfig, load_config, resolve_config_path
from supervisor._credentials import ADMIN, GATEWAY, SUPERVISOR, agent_identity
from supervisor._runtime import (
    Runtime,
    configured_database_url,
    configured_nats_url,
    credentials_for,
    creds_dir,
    nats_servers,
    pid_alive,
    state_dir,
    topology,
)
from supervisor.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="corral: run a team of AI agents in production.",
)
agent_app = typer.Typer(no_args_is_help=True, help="Run one agent as a service.")
supervisor_app = typer.Typer(no_args_is_help=True, help="Run the supervisor as a service.")
app.add_typer(agent_app, name="agent")
app.add_typer(supervisor_app, name="supervisor")
gateway_app = typer.Typer(no_args_is_help=True, help="Run the tool gateway as its own service.")
app.add_typer(gateway_app, name="gateway")
kill_app = typer.Typer(no_args_is_help=True, help="Kill an agent or a conversation (durable).")
revive_app = typer.Typer(no_args_is_help=True, help="Undo `corral kill agent`.")
app.add_typer(kill_app, name="kill")
app.add_typer(revive_app, name="revive")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="corral.yaml (default: ./corral.yaml, else the sample team)"),
]

EXIT_NOT_REPLIED = 1
EXIT_CONFIG = 2
EXIT_WAITING = 3
EXIT_TIMEOUT = 4


def main() -> None:
    """Entry point of the ``corral`` console script."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    app()


def _load(config: str | None) -> LoadedConfig:
    try:
        return load_config(resolve_config_path(config))
    except ConfigError as exc:
        err_console.print(f"[red]config error[/red]\n{exc}", highlight=False)
        raise typer.Exit(EXIT_CONFIG) from exc


def _setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("nats", "asyncio", "LiteLLM", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _nats_url(loaded: LoadedConfig) -> str:
    return configured_nats_url(loaded) or _running(loaded, "NATS server", "NATS_URL").nats_url


def _database_url(loaded: LoadedConfig) -> str:
    return configured_database_url(loaded) or _running(loaded, "database", "DATABASE_URL").database_url


def _running(loaded: LoadedConfig, what: str, variable: str) -> Runtime:
    runtime = Runtime.read(state_dir(loaded))
    if runtime is None:
        err_console.print(f"no {what}: start the team with `corral up` or set {variable}")
        raise typer.Exit(1)
    return runtime


def _run(coro: Coroutine[Any, Any, int]) -> None:
    try:
        code = asyncio.run(coro)
    except CorralError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


class _Service(Protocol):
    async def run(self) -> None: ...
    async def shutdown(self) -> None: ...


async def _serve(service: _Service) -> None:
    """Run ``service`` until SIGTERM/SIGINT, or until the launcher that started us dies."""
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


async def _watch_parent(pid: int, service: _Service) -> None:
    # An orphaned child must not keep consuming after its launcher was killed.
    while os.getppid() == pid:  # noqa: ASYNC110 - nothing to wait on but the kernel's answer
        await asyncio.sleep(1.0)
    logging.getLogger(__name__).warning("launcher %d is gone; stopping", pid)
    await service.shutdown()


async def _connect(loaded: LoadedConfig, url: str, identity: str, *, forever: bool = True) -> Bus:
    """Connect as ``identity``, with its seed when the server requires identities."""
    seed = credentials_for(loaded, identity)
    return await connect(
        BusConfig(
            servers=nats_servers(url),
            name=f"corral-{identity}",
            identity=identity,
            nkey_seed_file=str(seed) if seed else None,
            reconnect_forever=forever,
        )
    )


# --- services -------------------------------------------------------------------------


@supervisor_app.command("run")
def supervisor_run(config: ConfigOption = None) -> None:
    """Run the supervisor: enforce the handoff graph and record conversations."""
    loaded = _load(config)
    _setup_logging()

    async def _main() -> int:
        from bus import MaxDeliveriesWatcher, ensure_topology
        from supervisor._budgets import Budgets
        from supervisor._decide import Graph
        from supervisor._journal import JournalService
        from supervisor._store import Store
        from supervisor._supervisor import Supervisor

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
            )
            services: list[_Service] = [
                supervisor,
                JournalService(bus.nc, store.pool, Budgets.from_config(loaded)),
                MaxDeliveriesWatcher(bus.nc, bus.js, subjects.WORK_STREAM, supervisor.dead_step),
            ]
            if loaded.config.tools is not None and not loaded.config.tools.separate_gateway:
                services.append(await _gateway(loaded, bus, store))
            await _serve(_Together(services))
        finally:
            await bus.close()
            await store.close()
        return 0

    _run(_main())


async def _gateway(loaded: LoadedConfig, bus: Bus, store: Any) -> _Service:
    """The tool gateway of ``loaded``'s tools, with its backend prepared."""
    import importlib
    from datetime import timedelta

    from supervisor._budgets import Budgets
    from supervisor._config import load_tools
    from supervisor._gateway import GatewayConfig, ToolGateway
    from supervisor._policy import PolicyEngine

    tools_section = loaded.config.tools
    assert tools_section is not None and loaded.policies_dir is not None
    module = importlib.import_module(tools_section.module)
    setup = getattr(module, "setup", None)
    if setup is not None:
        async with store.pool.acquire() as conn:
            await setup(conn)
    return ToolGateway(
        bus.nc,
        store.pool,
        load_tools(loaded.config).values(),
        PolicyEngine.load(loaded.policies_dir),
        GatewayConfig(
            budgets=Budgets.from_config(loaded),
            approval_ttl=timedelta(seconds=tools_section.approval_ttl_s),
            max_pending_approvals=tools_section.max_pending_approvals,
        ),
    )


class _Together:
    """Several services as one: run all, stop all when one stops."""

    def __init__(self, services: list[_Service]) -> None:
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
        from supervisor._store import Store

        bus = await _connect(loaded, _nats_url(loaded), GATEWAY)
        store = await Store.open(_database_url(loaded))
        try:
            await _serve(await _gateway(loaded, bus, store))
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
        from agents import AgentService, AgentSettings
        from router import model_for_tier
        from supervisor._config import load_tools

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
                max_deliver=loaded.config.nats.max_deliver,
            )
            await _serve(AgentService(settings, bus, model))
        finally:
            await bus.close()
        return 0

    _run(_main())


# --- the stack ------------------------------------------------------------------------


def _launcher(loaded: LoadedConfig, replicas: dict[str, int] | None = None) -> Any:
    from supervisor._launcher import Launcher, LauncherConfig

    return Launcher(LauncherConfig(loaded=loaded, state_dir=state_dir(loaded), replicas=replicas or {}))


def _parse_replicas(loaded: LoadedConfig, values: list[str]) -> dict[str, int]:
    """``["payments=2"]`` -> ``{"payments": 2}``, checked against the config."""
    out: dict[str, int] = {}
    for value in values:
        name, _, count = value.partition("=")
        if name not in loaded.config.agents or not count.isdigit() or int(count) < 1:
            err_console.print(
                f"--replicas {value!r}: expected AGENT=N with N >= 1 and AGENT one of "
                f"{', '.join(loaded.agent_names)}"
            )
            raise typer.Exit(EXIT_CONFIG)
        out[name] = int(count)
    return out


async def _with_stack(
    loaded: LoadedConfig,
    body: Callable[[Runtime], Awaitable[int]] | None,
    replicas: dict[str, int] | None = None,
) -> int:
    launcher = _launcher(loaded, replicas)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(launcher.shutdown()))
    runner: asyncio.Task[None] | None = None
    try:
        runtime = await launcher.start()
        runner = asyncio.create_task(launcher.run())
        console.print(
            f"corral is up: NATS {runtime.nats_url}; "
            f"{len(runtime.children)} processes; logs in {state_dir(loaded) / 'logs'}"
        )
        code = 0
        if body is not None:
            code = await body(runtime)
        if body is None or code < 0:
            console.print("Ctrl-C stops everything.")
            await runner
            return 0
        return code
    finally:
        await launcher.shutdown()
        if runner is not None:
            await runner


@app.command()
def up(
    config: ConfigOption = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option("--replicas", help="AGENT=N: run N processes of AGENT (they share its inbox)"),
    ] = None,
) -> None:
    """Start NATS and PostgreSQL (embedded unless configured), the supervisor and every agent."""
    loaded = _load(config)
    counts = _parse_replicas(loaded, replicas or [])
    _setup_logging()
    _run(_with_stack(loaded, None, counts))


@app.command()
def down(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
) -> None:
    """Stop a stack started by ``corral up`` from this directory."""
    loaded = _load(config)
    runtime = Runtime.read(state_dir(loaded))
    if runtime is None:
        console.print("corral is not running here")
        raise typer.Exit(0)
    os.kill(runtime.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Runtime.read(state_dir(loaded)) is None:
            console.print("corral stopped")
            raise typer.Exit(0)
        time.sleep(0.1)
    err_console.print(f"corral (pid {runtime.pid}) did not stop within {timeout:.0f}s")
    raise typer.Exit(1)


@app.command()
def demo(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Exit after the samples")] = False,
    scenarios: Annotated[str | None, typer.Option(help="Scenarios file")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per conversation")] = 60.0,
) -> None:
    """Start the team, send the sample conversations, and print each path and reply."""
    loaded = _load(config)
    _setup_logging(logging.WARNING)
    scenarios_file = Path(scenarios) if scenarios else loaded.path.parent / "scenarios.yaml"
    samples = yaml.safe_load(scenarios_file.read_text())["conversations"]

    async def _samples(runtime: Runtime) -> int:
        from supervisor._client import send_until_settled, watching

        bus = await _connect(loaded, runtime.nats_url, subjects.DEFAULT_CLIENT, forever=False)
        failures = 0
        try:
            for sample in samples:
                console.print(f"\n[bold]{sample['name']}[/bold]: {sample['text']}")
                try:
                    settled = await send_until_settled(
                        bus,
                        sample["text"],
                        customer=sample.get("customer", ""),
                        timeout_s=timeout,
                        on_update=_print_update,
                    )
                    if isinstance(settled, ConversationWaiting):
                        # The demo plays the human: it approves, and the conversation resumes.
                        console.print(
                            f"  waiting for approval {settled.approval_id}; "
                            "approving it as the demo operator",
                            highlight=False,
                        )
                        async with watching(bus, settled.conversation, on_update=_print_update) as done:
                            await _decide(loaded, settled.approval_id, True, "demo", "")
                            resumed = await asyncio.wait_for(done, timeout)
                        assert isinstance(resumed, ConversationEnded)
                        settled = resumed
                    assert isinstance(settled, ConversationEnded)
                    ended = settled
                except TimeoutError:
                    console.print(f"  [red]timed out after {timeout:.0f}s[/red]")
                    failures += 1
                    continue
                _print_ended(ended)
                problem = _check_expectation(ended, sample.get("expect", {}))
                if problem:
                    console.print(f"  [red]unexpected: {problem}[/red]")
                    failures += 1
                else:
                    console.print("  [green]as expected[/green]")
        finally:
            await bus.close()
        console.print(f"\n{len(samples) - failures}/{len(samples)} conversations ended as expected")
        if not once:
            return -1
        return 0 if failures == 0 else 1

    _run(_with_stack(loaded, _samples))


def _check_expectation(ended: ConversationEnded, expect: dict[str, Any]) -> str | None:
    path = [hop.agent for hop in ended.path]
    if "status" in expect and ended.status != expect["status"]:
        return f"status {ended.status}, expected {expect['status']}"
    if "path" in expect and path != expect["path"]:
        return f"path {path}, expected {expect['path']}"
    if "reply_contains" in expect and expect["reply_contains"] not in (ended.reply or ""):
        return f"reply does not contain {expect['reply_contains']!r}"
    if "reason_contains" in expect and expect["reason_contains"] not in (ended.reason or ""):
        return f"reason does not contain {expect['reason_contains']!r}"
    return None


def _print_update(update: ClientUpdate) -> None:
    """Tool decisions as they happen: the client sees each and the policies behind it."""
    if isinstance(update, ToolDecided):
        policies = f" [{', '.join(update.policy_ids)}]" if update.policy_ids else ""
        line = f"  tool:   {update.agent} {update.tool} -> {update.status}{policies}"
        if update.reason:
            line += f": {update.reason}"
        if update.status == "simulated" and update.result:
            line += f" (would: {update.result.get('would', '')})"
        console.print(line, highlight=False)


def _print_ended(ended: ConversationEnded) -> None:
    from supervisor._client import format_path

    console.print(f"  path:   {format_path(ended)}", highlight=False)
    console.print(f"  status: {ended.status}", highlight=False)
    if ended.reply:
        console.print(f"  reply:  {ended.reply}", highlight=False)
    if ended.reason:
        console.print(f"  reason: {ended.reason}", highlight=False)


# --- clients --------------------------------------------------------------------------


@app.command()
def send(
    text: Annotated[str, typer.Argument(help="The customer's message")],
    config: ConfigOption = None,
    customer: Annotated[str, typer.Option(help="Customer id")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the outcome")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Policy-check and simulate every tool call; change nothing")
    ] = False,
) -> None:
    """Start a conversation; with --wait, print its tool decisions, path and reply.

    Exit codes with --wait: 0 replied, 1 refused/escalated/failed/killed (reason printed),
    3 waiting for an approval (its id printed), 4 timeout.
    """
    loaded = _load(config)

    async def _main() -> int:
        from supervisor._client import send_until_settled, start_conversation

        bus = await _connect(loaded, _nats_url(loaded), subjects.DEFAULT_CLIENT, forever=False)
        try:
            if not wait:
                conversation = await start_conversation(bus, text, customer=customer, dry_run=dry_run)
                console.print(conversation)
                return 0
            try:
                settled = await send_until_settled(
                    bus, text, customer=customer, timeout_s=timeout, dry_run=dry_run, on_update=_print_update
                )
            except TimeoutError:
                err_console.print(f"no outcome within {timeout:.0f}s")
                return EXIT_TIMEOUT
            console.print(f"conversation {settled.conversation}", highlight=False)
            if isinstance(settled, ConversationWaiting):
                console.print(f"  status: waiting for approval {settled.approval_id}", highlight=False)
                console.print(f"  reason: {settled.reason}", highlight=False)
                console.print(
                    f"  decide: corral approve {settled.approval_id}"
                    f"  |  corral deny {settled.approval_id} --reason TEXT"
                )
                return EXIT_WAITING
            _print_ended(settled)
            return 0 if settled.status == "replied" else EXIT_NOT_REPLIED
        finally:
            await bus.close()

    _run(_main())


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """List processes, streams, consumers and pending messages."""
    loaded = _load(config)
    runtime = Runtime.read(state_dir(loaded))

    async def _main() -> int:
        report: dict[str, Any] = {
            "running": runtime is not None,
            "processes": [],
            "streams": [],
            "consumers": [],
        }
        if runtime is not None:
            report["processes"] = [
                {
                    "name": c.name,
                    "role": c.role,
                    "pid": c.pid,
                    "alive": c.pid is not None and pid_alive(c.pid),
                    "restarts": c.restarts,
                }
                for c in runtime.children
            ]
        url = configured_nats_url(loaded) or (runtime.nats_url if runtime else None)
        if url:
            try:
                bus = await _connect(loaded, url, ADMIN, forever=False)
            except BusError as exc:
                report["nats_error"] = str(exc)
            else:
                try:
                    await _bus_report(bus, report)
                finally:
                    await bus.close()
        if as_json:
            console.print_json(json.dumps(report))
        else:
            _print_status(report)
        return 0

    _run(_main())


async def _bus_report(bus: Bus, report: dict[str, Any]) -> None:
    for name in (subjects.WORK_STREAM, subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM):
        with contextlib.suppress(Exception):
            info = await bus.js.stream_info(name)
            report["streams"].append(
                {"name": name, "messages": info.state.messages, "bytes": info.state.bytes}
            )
    report["kill_switches"] = [
        {"key": key, "reason": switch.reason, "by": switch.by, "at": switch.at}
        for key, switch in (await list_kills(bus.js)).items()
    ]
    with contextlib.suppress(Exception):
        for consumer in await bus.js.consumers_info(subjects.WORK_STREAM):
            report["consumers"].append(
                {
                    "name": consumer.name,
                    "pending": consumer.num_pending,
                    "ack_pending": consumer.num_ack_pending,
                    "redelivered": consumer.num_redelivered,
                }
            )


def _print_status(report: dict[str, Any]) -> None:
    from rich.table import Table

    if not report["running"]:
        console.print("corral up is not running from this directory")
    if report["processes"]:
        table = Table("process", "role", "pid", "alive", "restarts", title="processes")
        for p in report["processes"]:
            table.add_row(
                p["name"],
                p["role"],
                str(p["pid"]),
                "yes" if p["alive"] else "NO",
                str(p["restarts"]),
            )
        console.print(table)
    if report["streams"]:
        table = Table("stream", "messages", "bytes", title="streams")
        for s in report["streams"]:
            table.add_row(s["name"], str(s["messages"]), str(s["bytes"]))
        console.print(table)
    if report["consumers"]:
        table = Table("consumer", "pending", "ack pending", "redelivered", title="consumers")
        for c in report["consumers"]:
            table.add_row(c["name"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"]))
        console.print(table)
    if report.get("kill_switches"):
        table = Table("kill switch", "reason", "by", title="kill switches")
        for k in report["kill_switches"]:
            table.add_row(k["key"], k["reason"], k["by"])
        console.print(table)
    if "nats_error" in report:
        console.print(f"NATS: {report['nats_error']}")


# --- kill switches and credentials ----------------------------------------------------


def _switch(loaded: LoadedConfig, target: KillTarget, name: str, reason: str | None) -> None:
    async def _main() -> int:
        bus = await _connect(loaded, _nats_url(loaded), ADMIN, forever=False)
        try:
            by = os.environ.get("USER", "")
            if reason is None:
                changed = await clear_kill(bus.js, target, name)
                console.print(f"{target} {name} revived" if changed else f"{target} {name} was not killed")
            else:
                await set_kill(bus.js, target, name, reason, by=by)
                console.print(f"{target} {name} killed: {reason}")
        finally:
            await bus.close()
        return 0

    _run(_main())


@kill_app.command("agent")
def kill_agent(
    name: Annotated[str, typer.Argument(help="The agent to kill")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why; shown to everyone it affects")] = "killed by an operator",
) -> None:
    """Stop forwarding to NAME, refuse what it sends, revoke its identity, escalate its
    waiting conversations to a human."""
    loaded = _load(config)
    if name not in loaded.config.agents:
        err_console.print(f"unknown agent {name!r}; defined: {', '.join(loaded.agent_names)}")
        raise typer.Exit(EXIT_CONFIG)
    _switch(loaded, "agent", name, reason)


@kill_app.command("conversation")
def kill_conversation(
    conversation: Annotated[str, typer.Argument(help="The conversation id")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why")] = "killed by an operator",
) -> None:
    """End a conversation now: no further step of it runs anywhere."""
    _switch(_load(config), "conversation", conversation, reason)


@revive_app.command("agent")
def revive_agent(
    name: Annotated[str, typer.Argument(help="The agent to revive")], config: ConfigOption = None
) -> None:
    """Restore a killed agent: its identity is accepted again and work flows to it."""
    _switch(_load(config), "agent", name, None)


@app.command()
def creds(
    config: ConfigOption = None,
    out: Annotated[str | None, typer.Option(help="Directory (default: <state_dir>/creds)")] = None,
) -> None:
    """Write one nkey identity per agent, supervisor, client and admin, and the nats-server
    authorization block that grants each exactly its permissions (for an external NATS)."""
    from supervisor._credentials import authorization_block, identities

    loaded = _load(config)
    directory = Path(out) if out else creds_dir(loaded)
    ids = identities(loaded, directory)
    block = directory / "nats-authorization.conf"
    block.write_text(authorization_block(ids))
    console.print(f"wrote {len(ids)} identities (mode 0600) and {block}", highlight=False)
    for identity in ids:
        console.print(f"  {identity.name:<24} {identity.seed_file}", highlight=False)
    console.print(
        "Add `include nats-authorization.conf` to the server's config and reload it; give each "
        "process only its own seed (CORRAL_CREDS=path)."
    )


# --- audit ----------------------------------------------------------------------------

audit_app = typer.Typer(no_args_is_help=True, help="Inspect the audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(config: ConfigOption = None) -> None:
    """Recompute every audit record's hash and its link to the record before it.

    Exit codes: 0 the chain is intact (the record count is printed), 1 a record is broken (its
    id and the reason go to stderr).
    """
    loaded = _load(config)

    async def _main() -> int:
        import asyncpg

        from supervisor._audit import verify_audit
        from supervisor._store import Store
        from supervisor.errors import StoreError

        url = _database_url(loaded)
        # Opening the store applies pending migrations, so a fresh database verifies as empty.
        await (await Store.open(url, min_size=1, max_size=1)).close()
        try:
            conn = await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            result = await verify_audit(conn)
        finally:
            await conn.close()
        if result.first_broken is not None:
            err_console.print(
                f"audit log broken at record {result.first_broken}: {result.problem}",
                highlight=False,
                soft_wrap=True,
            )
            return 1
        console.print(f"audit log intact: {result.count} records", highlight=False)
        if result.head is not None:
            console.print(f"head: {result.head}", highlight=False, soft_wrap=True)
        return 0

    _run(_main())


# --- approvals and compensation -------------------------------------------------------


async def _operator_pool(loaded: LoadedConfig) -> Any:
    import asyncpg

    return await asyncpg.create_pool(_database_url(loaded), min_size=1, max_size=2)


@app.command()
def approvals(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """List the approval requests waiting for a decision."""
    loaded = _load(config)

    async def _main() -> int:
        from rich.table import Table

        from supervisor._approvals import pending_approvals

        pool = await _operator_pool(loaded)
        try:
            pending = await pending_approvals(pool)
        finally:
            await pool.close()
        if as_json:
            console.print_json(json.dumps([a.__dict__ for a in pending]))
            return 0
        table = Table(
            "id",
            "conversation",
            "agent",
            "tool",
            "arguments",
            "approver",
            "policies",
            title="pending approvals",
        )
        for a in pending:
            table.add_row(
                a.id,
                a.conversation,
                a.agent,
                a.tool,
                json.dumps(a.arguments),
                a.approver,
                ", ".join(a.policy_ids),
            )
        console.print(table)
        return 0

    _run(_main())


async def _decide(loaded: LoadedConfig, approval_id: str, approve: bool, by: str, reason: str) -> Any:
    """Record the decision, then tell the supervisor (it re-reads it from the database)."""
    from bus import ApprovalDecided, publish
    from supervisor._approvals import decide_approval

    pool = await _operator_pool(loaded)
    try:
        record = await decide_approval(pool, approval_id, approve=approve, by=by, reason=reason)
    finally:
        await pool.close()
    bus = await _connect(loaded, _nats_url(loaded), ADMIN, forever=False)
    try:
        await publish(
            bus.js,
            subjects.approval_decisions(),
            ApprovalDecided(approval_id=approval_id),
            msg_id=f"approval.{approval_id}",
        )
    finally:
        await bus.close()
    return record


def _decide_approval(loaded: LoadedConfig, approval_id: str, approve: bool, by: str, reason: str) -> None:
    async def _main() -> int:
        from supervisor._approvals import ApprovalError

        try:
            record = await _decide(loaded, approval_id, approve, by, reason)
        except ApprovalError as exc:
            err_console.print(str(exc))
            return 1
        verb = "approved" if approve else "denied"
        console.print(
            f"{approval_id} {verb} by {by}: {record.agent} {record.tool} "
            f"{json.dumps(record.arguments)} in {record.conversation}",
            highlight=False,
        )
        return 0

    _run(_main())


@app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who approves (a person, or a role)")] = None,
) -> None:
    """Grant one pending approval; the waiting conversation resumes and the call goes through."""
    _decide_approval(_load(config), approval_id, True, by or os.environ.get("USER", "operator"), "")


@app.command()
def deny(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    reason: Annotated[str, typer.Option(help="Why; the agent and the client see it")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who denies")] = None,
) -> None:
    """Deny one pending approval; the waiting conversation resumes with the denial."""
    _decide_approval(_load(config), approval_id, False, by or os.environ.get("USER", "operator"), reason)


@app.command()
def rollback(
    conversation: Annotated[str, typer.Argument(help="The conversation to compensate")],
    config: ConfigOption = None,
) -> None:
    """Run the undo of every tool call the conversation applied, newest first."""
    loaded = _load(config)

    async def _main() -> int:
        from supervisor._config import load_tools
        from supervisor._gateway import rollback as run_rollback

        pool = await _operator_pool(loaded)
        try:
            report = await run_rollback(
                pool, load_tools(loaded.config), conversation, os.environ.get("USER", "operator")
            )
        finally:
            await pool.close()
        if not report:
            console.print(f"nothing to roll back in {conversation}")
        for entry in report:
            console.print(f"  {entry['tool']} -> {entry['undo'] or '-'}: {entry['outcome']}", highlight=False)
        return 0

    _run(_main())

"""`corral up`, `down`, `demo`, `send`, `status`: running the team and talking to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from corral.bus import (
    Bus,
    BusError,
    ClientUpdate,
    ConversationEnded,
    ConversationWaiting,
    ToolDecided,
    list_kills,
    subjects,
)
from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    EXIT_NOT_REPLIED,
    EXIT_TIMEOUT,
    EXIT_WAITING,
    ConfigOption,
    _connect,
    _load,
    _nats_url,
    _run,
    _setup_logging,
    app,
    console,
    err_console,
)
from corral.supervisor.stack._credentials import ADMIN
from corral.supervisor.stack._runtime import Runtime, pid_alive
from corral.supervisor.stack._settings import Settings

if TYPE_CHECKING:
    from corral.supervisor.stack._launcher import Launcher

# --- the stack ------------------------------------------------------------------------


def _launcher(settings: Settings, replicas: dict[str, int] | None = None) -> Launcher:
    from corral.supervisor.stack._launcher import Launcher, LauncherConfig

    return Launcher(LauncherConfig(settings=settings, replicas=replicas or {}))


def _parse_replicas(settings: Settings, values: list[str]) -> dict[str, int]:
    """``["payments=2"]`` -> ``{"payments": 2}``, checked against the config."""
    out: dict[str, int] = {}
    for value in values:
        name, _, count = value.partition("=")
        if name not in settings.config.agents or not count.isdigit() or int(count) < 1:
            err_console.print(
                f"--replicas {value!r}: expected AGENT=N with N >= 1 and AGENT one of "
                f"{', '.join(settings.loaded.agent_names)}"
            )
            raise typer.Exit(EXIT_CONFIG)
        out[name] = int(count)
    return out


async def _with_stack(
    settings: Settings,
    body: Callable[[Runtime], Awaitable[int]] | None,
    replicas: dict[str, int] | None = None,
) -> int:
    """Run the stack while ``body`` runs (a negative code: until a signal stops it; no body:
    until then too); leaving stops every process and waits for each to exit."""
    launcher = _launcher(settings, replicas)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(launcher.shutdown()))
    async with launcher:
        runtime = launcher.runtime
        assert runtime is not None  # start() sets it
        console.print(
            f"corral is up: NATS {runtime.nats_url}; "
            f"{len(runtime.children)} processes; logs in {settings.state_dir / 'logs'}"
        )
        code = 0
        if body is not None:
            code = await body(runtime)
        if body is None or code < 0:
            console.print("Ctrl-C stops everything.")
            await launcher.wait()
            return 0
        return code


@app.command()
def up(
    config: ConfigOption = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option("--replicas", help="AGENT=N: run N processes of AGENT (they share its inbox)"),
    ] = None,
) -> None:
    """Start NATS and PostgreSQL (embedded unless configured), the supervisor and every agent."""
    settings = _load(config)
    counts = _parse_replicas(settings, replicas or [])
    _setup_logging()
    _run(_with_stack(settings, None, counts))


@app.command()
def migrate(config: ConfigOption = None) -> None:
    """As the database's owner (``DATABASE_URL``): apply corral's migrations, which create the
    roles ``corral_supervisor`` and ``corral_tools`` if this role may, and run the tools'
    ``setup``. With ``CORRAL_SUPERVISOR_PASSWORD`` set, it also becomes
    ``corral_supervisor``'s password (the supervisor's DSN then names that role).
    ``corral up`` does all of this itself."""
    settings = _load(config)

    async def _main() -> int:
        from corral.supervisor.cli._shared import _database_url
        from corral.supervisor.store._roles import SUPERVISOR_ROLE, prepare_database, set_password

        url = _database_url(settings)
        tools = settings.config.tools
        await prepare_database(url, tools.reference if tools is not None else None)
        password = settings.supervisor_password
        if password:
            await set_password(url, password)
            console.print(f"{SUPERVISOR_ROLE}'s password set", highlight=False)
        console.print("database migrated", highlight=False)
        return 0

    _run(_main())


@app.command()
def down(
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
) -> None:
    """Stop a stack started by ``corral up`` from this directory."""
    settings = _load(config)
    runtime = Runtime.read(settings.state_dir)
    if runtime is None:
        console.print("corral is not running here")
        raise typer.Exit(0)
    os.kill(runtime.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Runtime.read(settings.state_dir) is None:
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
    settings = _load(config)
    _setup_logging(logging.WARNING)
    scenarios_file = Path(scenarios) if scenarios else settings.path.parent / "scenarios.yaml"
    samples = yaml.safe_load(scenarios_file.read_text())["conversations"]

    async def _samples(runtime: Runtime) -> int:
        from corral.supervisor.cli._operator import _decide
        from corral.supervisor.core._client import send_until_settled, watching

        bus = await _connect(settings, runtime.nats_url, subjects.DEFAULT_CLIENT, forever=False)
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
                            await _decide(settings, settled.approval_id, True, "demo", "")
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

    _run(_with_stack(settings, _samples))


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
    from corral.supervisor.core._client import format_path

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
    settings = _load(config)

    async def _main() -> int:
        from corral.supervisor.core._client import send_until_settled, start_conversation

        bus = await _connect(settings, _nats_url(settings), subjects.DEFAULT_CLIENT, forever=False)
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
    settings = _load(config)
    runtime = Runtime.read(settings.state_dir)

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
        url = settings.nats_url or (runtime.nats_url if runtime else None)
        if url:
            try:
                bus = await _connect(settings, url, ADMIN, forever=False)
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

"""`corral send`, `status`: talking to a running team, and what it prints."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any

import typer

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
    EXIT_NOT_REPLIED,
    EXIT_TIMEOUT,
    EXIT_WAITING,
    ConfigOption,
    _connect,
    _load,
    _nats_url,
    _run,
    app,
    console,
    err_console,
)
from corral.supervisor.stack._credentials import ADMIN
from corral.supervisor.stack._runtime import Runtime, pid_alive


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

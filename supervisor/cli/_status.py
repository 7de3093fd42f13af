"""What `corral status` reports: where the servers are, the processes of the stack (a
killed agent as killed), the streams, the consumers, the latest conversations and alerts,
and the kill switches, and how it prints them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from corral.supervisor.cli._shared import _connect, is_terminal, print_table, say, without_password

if TYPE_CHECKING:
    from corral.bus import Bus
    from corral.supervisor.stack._runtime import Runtime
    from corral.supervisor.stack._settings import Settings


async def status_report(settings: Settings) -> dict[str, Any]:
    """The report ``corral status --json`` prints (NATS is asked only when there is one)."""
    from corral.supervisor.stack._runtime import Runtime

    runtime = Runtime.read(settings.state_dir)
    url = settings.nats_url or (runtime.nats_url if runtime else None)
    report: dict[str, Any] = {
        "running": runtime is not None,
        "state_dir": str(settings.state_dir),
        "launcher_pid": runtime.pid if runtime else None,
        "nats_url": without_password(url) if url else None,
        "database_url": _database_address(settings, runtime),
        "processes": [],
        "streams": [],
        "consumers": [],
        "kill_switches": [],
        "conversations": [],
        "alerts": [],
    }
    if url:
        from corral.bus import BusError
        from corral.supervisor.stack._credentials import ADMIN

        try:
            bus = await _connect(settings, url, ADMIN, forever=False)
        except BusError as exc:
            report["nats_error"] = str(exc)
        else:
            try:
                await _bus_report(bus, report)
            finally:
                await bus.close()
    if runtime is not None:
        report["processes"] = _processes(runtime, report["kill_switches"])
    else:
        report["leftovers"] = _leftovers(settings)
    if runtime is not None or settings.database_url:
        await _conversations_report(settings, report)
    return report


async def _conversations_report(settings: Settings, report: dict[str, Any]) -> None:
    """The latest conversations, with their agent and what their model calls cost."""
    from corral.supervisor.cli._shared import _database
    from corral.supervisor.errors import StoreError
    from corral.supervisor.store._console import recent_alerts
    from corral.supervisor.store._reports import recent_conversations

    try:
        conn = await _database(settings)
    except StoreError as exc:
        report["database_error"] = str(exc)
        return
    try:
        found = await recent_conversations(conn, limit=10)
        report["alerts"] = await recent_alerts(conn, limit=10)
    finally:
        await conn.close()
    report["conversations"] = [
        {
            "id": c.id,
            "status": c.status,
            "agent": c.current_agent,
            "model_calls": c.model_calls,
            "cost_usd": c.cost_usd,
            "started": c.created_at.isoformat(),
        }
        for c in found
    ]


def _leftovers(settings: Settings) -> list[dict[str, Any]]:
    """What a ``corral up`` whose launcher is gone (killed, say) left running."""
    from corral.supervisor.stack._runtime import Runtime, embedded_postgres_dir

    state = settings.state_dir
    traces = (state / "nats" / "nats-server.pid", embedded_postgres_dir(state) / "postmaster.pid")
    if Runtime.recorded(state) is None and not any(path.exists() for path in traces):
        return []  # nothing was started from here (and psutil need not load)
    from corral.supervisor.stack._leftovers import find_leftovers

    return [
        {"name": p.name, "pid": p.pid, "kind": p.kind} for p in find_leftovers(state, launcher_alive=False)
    ]


def _database_address(settings: Settings, runtime: Runtime | None) -> str | None:
    """The configured DSN without its password, else the embedded PostgreSQL's (a socket)."""
    from corral.supervisor.stack._runtime import embedded_database_url

    if settings.database_url:
        return without_password(settings.database_url)
    if runtime is not None and runtime.embedded_postgres:
        return embedded_database_url(settings.state_dir)
    return None


def _processes(runtime: Runtime, kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from corral.bus import subjects
    from corral.supervisor.stack._runtime import pid_alive

    switches = {k["key"]: k for k in kills}
    processes = []
    for child in runtime.children:
        alive = child.pid is not None and pid_alive(child.pid)
        killed = switches.get(subjects.agent_control_key(child.role)) if child.role != "supervisor" else None
        state = "down" if not alive else "killed" if killed else "running" if child.ready else "starting"
        processes.append(
            {
                "name": child.name,
                "role": child.role,
                "pid": child.pid,
                "alive": alive,
                "state": state,
                "killed": {"reason": killed["reason"], "by": killed["by"], "at": killed["at"]}
                if killed
                else None,
                "restarts": child.restarts,
            }
        )
    return processes


async def _bus_report(bus: Bus, report: dict[str, Any]) -> None:
    import nats.errors
    from nats.js.errors import NotFoundError

    from corral.bus import list_kills, subjects

    problems = []
    for name in (subjects.WORK_STREAM, subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM):
        try:
            info = await bus.js.stream_info(name)
        except NotFoundError:
            continue  # not created yet: the supervisor creates the streams when it starts
        except nats.errors.Error as exc:
            problems.append(f"stream {name}: {exc!r}")
            continue
        report["streams"].append({"name": name, "messages": info.state.messages, "bytes": info.state.bytes})
    for key, switch in (await list_kills(bus.js)).items():
        target, _, name = key.partition(".")
        report["kill_switches"].append(
            {
                "key": key,
                "target": target,
                "name": name,
                "reason": switch.reason,
                "by": switch.by,
                "at": switch.at,
            }
        )
    try:
        consumers = await bus.js.consumers_info(subjects.WORK_STREAM)
    except NotFoundError:
        consumers = []
    except nats.errors.Error as exc:
        problems.append(f"consumers of {subjects.WORK_STREAM}: {exc!r}")
        consumers = []
    for consumer in consumers:
        report["consumers"].append(
            {
                "name": consumer.name,
                "pending": consumer.num_pending,
                "ack_pending": consumer.num_ack_pending,
                "redelivered": consumer.num_redelivered,
            }
        )
    if problems:
        report["nats_error"] = "; ".join(problems)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def print_status(report: dict[str, Any]) -> None:
    """The report as a person reads it: the addresses, then one table per part."""
    if report["running"]:
        say(f"corral is running from {report['state_dir']} (launcher pid {report['launcher_pid']})")
    else:
        say(f"corral up is not running from this directory (state: {report['state_dir']})")
    if report.get("leftovers"):
        left = ", ".join(f"{p['name']} (pid {p['pid']})" for p in report["leftovers"])
        say(f"its launcher is gone, but what it started still runs: {left}; `corral down` stops it")
    say(f"NATS:       {report['nats_url'] or 'none (corral up starts an embedded one)'}")
    say(f"PostgreSQL: {report['database_url'] or 'none (corral up starts an embedded one)'}")
    tables: list[tuple[str, list[str], list[list[str]]]] = [
        (
            "processes",
            ["process", "role", "pid", "state", "restarts"],
            [
                [p["name"], p["role"], str(p["pid"]), _state(p), str(p["restarts"])]
                for p in report["processes"]
            ],
        ),
        (
            "streams",
            ["stream", "messages", "bytes"],
            [[s["name"], str(s["messages"]), str(s["bytes"])] for s in report["streams"]],
        ),
        (
            "consumers",
            ["consumer", "pending", "ack pending", "redelivered"],
            [
                [c["name"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"])]
                for c in report["consumers"]
            ],
        ),
        (
            "latest conversations",
            ["conversation", "status", "agent", "model calls", "cost"],
            [
                [c["id"], c["status"], c["agent"], str(c["model_calls"]), f"${c['cost_usd']:.4f}"]
                for c in report["conversations"]
            ],
        ),
        (
            "latest alerts",
            ["alert", "about", "reason", "action", "at"],
            [
                [a["kind"], _about(a), a["reason"], a["action"] or "-", _when(a["at"])]
                for a in report["alerts"]
            ],
        ),
        (
            "kill switches",
            ["kill switch", "reason", "set by", "at"],
            [[k["key"], k["reason"], k["by"] or "-", _when(k["at"])] for k in report["kill_switches"]],
        ),
    ]
    for title, columns, rows in tables:
        if rows:
            if not is_terminal():
                say("")
            print_table(columns, rows, title=title)
    if "nats_error" in report:
        say(f"NATS: {report['nats_error']}")
    if "database_error" in report:
        say(f"PostgreSQL: {report['database_error']}")


def _state(process: dict[str, Any]) -> str:
    killed = process["killed"]
    if process["state"] == "killed" and killed:
        return f"killed by {killed['by'] or 'an operator'}: {killed['reason']}"
    return str(process["state"])


def _about(alert: dict[str, Any]) -> str:
    return str(alert["agent"] or alert["model"] or alert["conversation"] or "-")

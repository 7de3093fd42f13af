"""Chaos: sample conversations while processes die and servers restart.

    python bench/chaos.py --conversations 1000

Starts its own nats-server (JetStream, sync always) and PostgreSQL, runs `corral up`
against them with a variant of the sample team (every conversation either refunds one
of 40 orders or asks a question; every other refund takes two customer turns: payments
asks which order, and the customer's answer names it), and meanwhile SIGKILLs random agent processes and the
supervisor, restarts nats-server once (SIGKILL, then start on the same store) and
PostgreSQL once (immediate shutdown, as on a power loss, then start). Conversation
outcomes are read from PostgreSQL, not from the client's subscription, which a
restarting server may drop. Prints: attempted, completed, escalated, lost, duplicate
side effects, dead-lettered, longest recovery in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corral.bus import BusConfig, connect, subjects
from corral.supervisor import EmbeddedNats, EmbeddedPostgres, start_conversation
from corral.supervisor.core._client import send_message

ORDERS = [f"2{n:03d}" for n in range(40)]  # seeded: $45 each, all of cus_1005
TERMINAL = ("replied", "refused", "escalated", "failed", "killed")


@dataclass
class ChaosReport:
    """What happened to every conversation, and to the shop."""

    attempted: int = 0
    completed: int = 0
    escalated: int = 0
    lost: int = 0
    duplicate_side_effects: int = 0
    missing_side_effects: int = 0
    dead_lettered: int = 0
    longest_recovery_s: float = 0.0
    refunds_expected: int = 0
    refunds_applied: int = 0
    multi_turn: int = 0
    """Conversations that took two customer turns and were replied to."""
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _rules() -> dict[str, Any]:
    payments: list[dict[str, Any]] = [
        {
            "when": ["tool refund -> ok"],
            "answer": {
                "action": "handoff",
                "target": "account_manager",
                "confidence": 0.9,
                "reason": "refund issued",
            },
        },
        {
            "when": ["tool refund ->"],
            "answer": {
                "action": "handoff",
                "target": "account_manager",
                "confidence": 0.9,
                "reason": "no refund",
            },
        },
    ]
    payments += [
        {
            "when": [f"order {order}"],
            "answer": {
                "action": "tool",
                "tool": "refund",
                "arguments": {"order_id": order, "amount_cents": 4500},
            },
        }
        for order in ORDERS
    ]
    # No order named: ask which (the customer's answer names one, and a rule above takes it).
    payments.append(
        {
            "when": ["broken"],
            "answer": {
                "action": "reply",
                "text": "Which order?",
                "confidence": 0.9,
                "awaiting_customer": True,
            },
        }
    )
    return {
        "agents": {
            "triage": [
                {
                    "when": ["refund"],
                    "answer": {"action": "handoff", "target": "payments", "confidence": 0.9},
                },
                {"answer": {"action": "handoff", "target": "account_manager", "confidence": 0.9}},
            ],
            "payments": payments,
            "tech_support": [{"answer": {"action": "reply", "text": "ok", "confidence": 0.9}}],
            "account_manager": [{"answer": {"action": "reply", "text": "done", "confidence": 0.9}}],
        }
    }


def prepare(workdir: Path) -> Path:
    """A copy of the sample team whose policies let payments refund any order it owns."""
    config_dir = workdir / "support"
    shutil.copytree(REPO / "examples" / "support", config_dir)
    (config_dir / "scripted.yaml").write_text(yaml.safe_dump(_rules()))
    shutil.rmtree(config_dir / "policies")
    (config_dir / "policies").mkdir()
    (config_dir / "policies" / "chaos.cedar").write_text(
        '@id("CHAOS-1")\npermit(principal == Agent::"payments", action == Action::"refund", resource)\n'
        "when { resource in context.customer };\n"
    )
    config = yaml.safe_load((config_dir / "corral.yaml").read_text())
    config["nats"] = {"ack_wait_s": 5}
    config["conversation"] = {"max_steps": 10}
    (config_dir / "corral.yaml").write_text(yaml.safe_dump(config))
    return config_dir / "corral.yaml"


@dataclass(frozen=True)
class Planned:
    """One conversation of the run: its first message, and for a two-turn one the answer to
    payments' question."""

    id: str
    text: str
    customer: str
    order: str | None = None
    answer: str | None = None


def plan(conversations: int, seed: int) -> list[Planned]:
    """One refund per order (every other one in two turns), then questions."""
    rng = random.Random(seed)
    items = [
        Planned(f"c-chaos-{n:05d}", f"refund order {order}", "cus_1005", order)
        if n % 2
        else Planned(
            f"c-chaos-{n:05d}",
            "my blender is broken, refund please",
            "cus_1005",
            order,
            f"it was order {order}",
        )
        for n, order in enumerate(ORDERS)
    ]
    items = items[: min(len(items), conversations * 2 // 3)]
    items += [
        Planned(f"c-chaos-q{n:05d}", "a question about my plan", "cus_1002")
        for n in range(conversations - len(items))
    ]
    rng.shuffle(items)
    return items


async def run_chaos(
    conversations: int,
    workdir: Path,
    *,
    concurrency: int = 12,
    seed: int = 1,
    kill_every_s: tuple[float, float] = (1.5, 3.0),
    deadline_s: float = 600.0,
    max_kills: int | None = None,
    log: Any = print,
) -> ChaosReport:
    """Run the chaos experiment in ``workdir`` and report.

    Faults stop after ``max_kills`` SIGKILLs (default: one per ten conversations, at least
    six) and the two server restarts; then the team must finish every conversation.
    """
    max_kills = max_kills if max_kills is not None else max(6, conversations // 10)
    rng = random.Random(seed)
    config = prepare(workdir)
    nats = EmbeddedNats(workdir / "nats")
    nats.start()
    postgres = EmbeddedPostgres(workdir / "pg")
    dsn = postgres.start()
    env = {k: v for k, v in os.environ.items() if k not in {"CORRAL_CREDS"}}
    env.update(
        NATS_URL=nats.url, DATABASE_URL=dsn, CORRAL_STATE_DIR=str(workdir / "state"), CORRAL_API_PORT="0"
    )
    (workdir / "state").mkdir()
    up_log = open(workdir / "up.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "corral.supervisor", "up", "-c", str(config)],
        env=env,
        stdout=up_log,
        stderr=subprocess.STDOUT,
    )
    report = ChaosReport(attempted=conversations)
    started = time.monotonic()
    try:
        await _wait_ready(workdir, dsn, launcher)
        bus = await connect(BusConfig(servers=[nats.url], name="chaos-client"))
        items = plan(conversations, seed)
        by_id = {item.id: item for item in items}
        status: dict[str, str] = {}
        done_at: dict[str, float] = {}
        answering: dict[str, asyncio.Task[None]] = {}
        faults: list[float] = []
        finished = asyncio.Event()

        async def poll() -> None:
            while not finished.is_set():
                with contextlib.suppress(Exception):
                    conn = await asyncpg.connect(dsn, timeout=2)
                    try:
                        rows = await conn.fetch(
                            "SELECT id, status FROM conversations WHERE id = ANY($1::text[])",
                            [i.id for i in items],
                        )
                    finally:
                        await conn.close()
                    now = time.monotonic()
                    for row in rows:
                        status[row["id"]] = row["status"]
                        if row["status"] in TERMINAL and row["id"] not in done_at:
                            done_at[row["id"]] = now
                        if row["status"] == "awaiting_customer" and row["id"] not in answering:
                            answering[row["id"]] = asyncio.create_task(answer(by_id[row["id"]]))
                await asyncio.sleep(0.2)

        async def answer(item: Planned) -> None:
            """The customer's second turn; sent again (same message id: one turn) until taken."""
            assert item.answer is not None
            while True:
                try:
                    await send_message(bus, item.id, item.answer, message_id=f"m-{item.id}")
                    return
                except Exception:
                    await asyncio.sleep(0.5)

        async def send() -> None:
            for item in items:
                while sum(1 for i in items if i.id in sent and i.id not in done_at) >= concurrency:
                    await asyncio.sleep(0.05)
                while True:  # a restarting server refuses for a moment: retry, same id
                    try:
                        await start_conversation(bus, item.text, customer=item.customer, conversation=item.id)
                        break
                    except Exception:
                        await asyncio.sleep(0.5)
                sent.add(item.id)

        # The faults, in order: the supervisor dies, then an agent, then nats-server
        # restarts, more kills, PostgreSQL crashes and restarts, the last kills.
        schedule = ["supervisor", "agent", "nats"] + ["any"] * ((max_kills - 2) // 2) + ["postgres"]
        schedule += ["any"] * (max_kills - 2 - (max_kills - 2) // 2)

        async def chaos() -> None:
            for fault in schedule:
                await asyncio.sleep(rng.uniform(*kill_every_s))
                faults.append(time.monotonic())
                if fault == "nats":
                    report.faults.append("nats-server: SIGKILL and restart")
                    nats.kill()
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(nats.start)
                    continue
                if fault == "postgres":
                    report.faults.append("PostgreSQL: immediate shutdown and restart")
                    await asyncio.to_thread(postgres.stop, crash=True)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(postgres.start)
                    continue
                runtime = json.loads((workdir / "state" / "runtime.json").read_text())
                children = [c for c in runtime["children"] if c["pid"]]
                if fault == "supervisor":
                    victims = [c for c in children if c["role"] == "supervisor"]
                elif fault == "agent":
                    victims = [c for c in children if c["role"] != "supervisor"]
                else:
                    victims = children
                victim = rng.choice(victims)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim["pid"], signal.SIGKILL)
                report.faults.append(f"SIGKILL {victim['name']}")

        sent: set[str] = set()
        tasks = [asyncio.create_task(poll()), asyncio.create_task(send()), asyncio.create_task(chaos())]
        deadline = time.monotonic() + deadline_s
        # Every fault happens, and then every conversation must end.
        while time.monotonic() < deadline and (len(done_at) < len(items) or not tasks[2].done()):
            await asyncio.sleep(0.25)
            if tasks[0].done() or (tasks[1].done() and tasks[1].exception()):
                break
        finished.set()
        for task in [*tasks, *answering.values()]:
            task.cancel()
        await asyncio.gather(*tasks, *answering.values(), return_exceptions=True)
        report.seconds = time.monotonic() - started
        await _account(report, dsn, items, status, done_at, faults)
        with contextlib.suppress(Exception):
            report.dead_lettered = (await bus.js.stream_info(subjects.DEAD_LETTER_STREAM)).state.messages
        await bus.close()
        log(f"chaos: {len(report.faults)} faults in {report.seconds:.0f}s")
        return report
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        up_log.close()
        postgres.stop()
        nats.stop()


async def _wait_ready(workdir: Path, dsn: str, launcher: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"corral up exited: {(workdir / 'up.log').read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(dsn, timeout=2)
            try:
                if await conn.fetchval("SELECT count(*) FROM shop.orders"):
                    return
            finally:
                await conn.close()
        await asyncio.sleep(0.2)
    raise RuntimeError("the team did not get ready within 120 s")


async def _account(
    report: ChaosReport,
    dsn: str,
    items: list[Planned],
    status: dict[str, str],
    done_at: dict[str, float],
    faults: list[float],
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, status, (SELECT count(*) FROM jsonb_array_elements(turns) t"
            " WHERE t->>'role' <> 'tool') AS turns FROM conversations"
            " WHERE id = ANY($1::text[])",
            [i.id for i in items],
        )
        final = {r["id"]: r["status"] for r in rows}
        turns = {r["id"]: r["turns"] for r in rows}
        refunds = await conn.fetch("SELECT order_id, count(*) AS n FROM shop.refunds GROUP BY 1")
    finally:
        await conn.close()
    by_order = {r["order_id"]: r["n"] for r in refunds}
    report.completed = sum(1 for s in final.values() if s == "replied")
    report.escalated = sum(1 for s in final.values() if s in TERMINAL and s != "replied")
    report.lost = sum(1 for i in items if final.get(i.id) not in TERMINAL)
    report.duplicate_side_effects = sum(n - 1 for n in by_order.values() if n > 1)
    report.refunds_applied = sum(by_order.values())
    expected = [i.order for i in items if i.order is not None and final.get(i.id) == "replied"]
    # Two customer turns and two replies (the question, the answer); tool calls aside.
    report.multi_turn = sum(
        1 for i in items if i.answer and final.get(i.id) == "replied" and turns[i.id] == 4
    )
    report.refunds_expected = len(expected)
    report.missing_side_effects = sum(1 for order in expected if by_order.get(order, 0) == 0)
    completions = sorted(done_at.values())
    recoveries = [next((t for t in completions if t > fault), fault) - fault for fault in faults]
    report.longest_recovery_s = max(recoveries, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    report = asyncio.run(
        run_chaos(
            args.conversations,
            workdir,
            concurrency=args.concurrency,
            seed=args.seed,
            deadline_s=max(600.0, args.conversations * 2.0),
        )
    )
    rows = [
        ("attempted", report.attempted),
        ("completed", report.completed),
        ("escalated", report.escalated),
        ("lost", report.lost),
        ("duplicate side effects", report.duplicate_side_effects),
        ("missing side effects", report.missing_side_effects),
        ("dead-lettered", report.dead_lettered),
        ("longest recovery (s)", f"{report.longest_recovery_s:.1f}"),
        ("faults", len(report.faults)),
        ("wall time (s)", f"{report.seconds:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:<26}{value}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

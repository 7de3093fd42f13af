"""CS-4-slow: does corral keep a slow model busy? CS-4 where every model call takes 1 s.

    python bench/cs4_slow.py                                  # 1,000 conversations, 200 in flight
    python bench/cs4_slow.py --conversations 100 --in-flight 50   # a quick look (bound 12.5/s)
    python bench/cs4_slow.py --json slow.json

The CS-4 conversation (triage -> payments with one `refund` -> account_manager, four model
calls) on a fresh `corral up`, one replica per agent and one model gateway, at the
``http`` depth of bench/cs4.py: every tier is litellm's real ``openai`` provider over HTTP
to the local scripted OpenAI server (bench/openai_script.py), which waits ``--delay-s``
before every answer. A conversation then takes at least four delays, so with ``in flight``
conversations at once Little's law bounds the throughput at ``in flight / (4 x delay)``
(200 / 4 s = 50 conversations/s); the target is at least 0.9 of it. Every conversation is
verified (its reply and path) and every order must be refunded exactly once.

Reported: throughput against the bound, p50 and p99 end to end, CPU ms per conversation
and PSS of every corral process (the model gateway ``router`` included), and the OpenAI
server's own CPU and PSS apart (it plays the provider: not corral's cost); the most model
calls the server held at once (a cap below the calls in flight shows there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._phases import bounded, measure
from bench.cs4 import TEAM, Corral, machine, merge, phase_json

MODEL_CALLS = 4
"""Model calls on a CS-4 conversation's path, one after the other."""
TARGET = 0.9
"""The throughput CS-4-slow asks for, as a fraction of Little's-law bound."""


def bound(in_flight: int, delay_s: float) -> float:
    """Little's-law bound on conversations per second: ``in_flight`` at once, each taking
    at least ``MODEL_CALLS`` delays."""
    return in_flight / (MODEL_CALLS * delay_s)


async def run_slow(
    workdir: Path,
    *,
    conversations: int,
    in_flight: int,
    delay_s: float,
    warmup: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One CS-4-slow run on a fresh stack in ``workdir``; the report."""
    settings: dict[str, Any] = {"agents": {name: {"replicas": 1} for name in TEAM}, "router": {"replicas": 1}}
    merge(settings, overrides or {})
    # A conversation's latency grows with the queue when throughput falls short: allow for
    # it rather than counting a slow conversation as a lost one.
    timeout_s = max(120.0, 4 * MODEL_CALLS * delay_s * max(1.0, conversations / max(in_flight, 1)))
    corral = Corral(workdir, "http", delay_s=delay_s, overrides=settings, timeout_s=timeout_s)
    try:
        await corral.start(warmup + conversations)
        provider = corral.provider
        assert provider is not None
        # litellm's first calls in the gateway are slow (imports, its HTTP client): not measured.
        await bounded(corral.converse, range(warmup), max(1, min(warmup, in_flight)))
        generator = time.process_time()
        figures = await measure(
            corral.converse, corral.processes(), range(warmup, warmup + conversations), in_flight
        )
        generator = time.process_time() - generator
        stats = await asyncio.to_thread(provider.stats)
        refunds, orders = await corral.refunds()
    finally:
        await corral.stop()
    limit = bound(in_flight, delay_s)
    phase = phase_json(figures)
    return {
        "workload": "CS-4-slow",
        "machine": machine(),
        "conversations": conversations,
        "in_flight": in_flight,
        "delay_s": delay_s,
        "warmup": warmup,
        "per_second": phase["per_second"],
        "bound_per_second": round(limit, 2),
        "vs_bound": round(figures.per_second / limit, 3),
        # In a steady state a closed loop of in_flight conversations completes in_flight /
        # mean latency a second: this ratio leaves out the ramp at the start and the tail at
        # the end, which weigh on a short run.
        "steady_vs_bound": round(MODEL_CALLS * delay_s * 1000 / figures.mean_ms, 3)
        if figures.mean_ms
        else 0.0,
        "target_vs_bound": TARGET,
        "min_latency_ms": MODEL_CALLS * delay_s * 1000,
        "phase": phase,
        "cores_busy_by_process": {
            k: round(v * figures.conversations / 1000 / figures.seconds, 2)
            for k, v in {**figures.cpu_ms_by_process, **figures.outside_cpu_ms}.items()
        }
        if figures.seconds
        else {},
        "server": stats,
        "load_generator_cpu_ms_per_conversation": round(generator * 1000 / max(conversations, 1), 2),
        "refunds": refunds,
        "refunded_orders": orders,
        "orders": warmup + conversations,
    }


def table(report: dict[str, Any]) -> str:
    """The report as text."""
    phase = report["phase"]
    lines = [
        f"CS-4-slow: {report['conversations']} conversations, {report['in_flight']} in flight, "
        f"every model call {report['delay_s']:g} s at the server (http depth, one replica per agent)",
        "",
        f"throughput {report['per_second']:.1f} conv/s against the bound {report['bound_per_second']:.1f} "
        f"(in flight / {MODEL_CALLS} x {report['delay_s']:g} s): x{report['vs_bound']:.2f} "
        f"(target >= {TARGET})",
        f"end to end p50 {phase['p50_ms']:.0f} ms, p99 {phase['p99_ms']:.0f} ms, mean {phase['mean_ms']:.0f} "
        f"(at least {report['min_latency_ms']:.0f}): "
        f"in a steady state x{report['steady_vs_bound']:.2f} the bound",
        f"model calls the server held at once: at most {report['server']['peak_in_flight']} "
        f"(of {report['in_flight']} conversations in flight); {report['server']['served']} answered",
        "from a model's answer to the same conversation's next call (corral's part, at the server): "
        + _quantiles(report["server"]["between_calls_ms"]),
        *(f"  {hop:<34}{_quantiles(q)}" for hop, q in report["server"]["between_calls_ms_by_hop"].items()),
        "",
        f"{'process':<26}{'CPU ms/conv':>13}{'cores':>8}{'PSS MB':>9}",
    ]
    cores = report["cores_busy_by_process"]
    for name, ms in phase["cpu_ms_by_process"].items():
        lines.append(
            f"{name:<26}{ms:>13.2f}{cores.get(name, 0):>8.2f}{phase['pss_mb_by_process'].get(name, 0):>9.0f}"
        )
    lines.append(
        f"{'corral, total':<26}{phase['cpu_ms_per_conversation']:>13.2f}{'':>8}{phase['pss_mb']:>9.0f}"
    )
    if "provider_cpu_ms_per_conversation" in phase:
        provider = sum(v for k, v in cores.items() if k not in phase["cpu_ms_by_process"])
        lines.append(
            f"{'provider (not counted)':<26}{phase['provider_cpu_ms_per_conversation']:>13.2f}"
            f"{provider:>8.2f}{phase['provider_pss_mb']:>9.0f}"
        )
    lines.append(
        f"{report['refunds']} refunds of {report['refunded_orders']} orders ({report['orders']} seeded)"
    )
    return "\n".join(lines)


def _quantiles(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} ms" for k, v in figures.items() if k != "count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=200, help="conversations at once")
    parser.add_argument("--delay-s", type=float, default=1.0, help="seconds every model call takes")
    parser.add_argument("--warmup", type=int, default=20, help="conversations before the measured ones")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a corral.yaml setting for the run, e.g. router.replicas=2 (VALUE is YAML; repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    for setting in args.set:
        key, _, value = setting.partition("=")
        *parents, last = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    workdir = Path(tempfile.mkdtemp(prefix="corral-cs4-slow-"))
    try:
        report = asyncio.run(
            run_slow(
                workdir,
                conversations=args.conversations,
                in_flight=args.in_flight,
                delay_s=args.delay_s,
                warmup=args.warmup,
                overrides=overrides,
            )
        )
    finally:
        if args.keep:
            print(f"working directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(report))
    if args.json:
        report["settings"] = overrides
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report["refunds"] != report["orders"] or report["refunded_orders"] != report["orders"]:
        sys.exit("refunds do not match conversations")


if __name__ == "__main__":
    main()

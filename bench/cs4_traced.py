"""CS-4-TRACED: what tracing costs, and whether the console holds up, under CS-4.

    python bench/cs4_traced.py                      # 3 runs, CS-4 sizes
    python bench/cs4_traced.py --runs 1 --json traced.json

Each run, interleaved: the floor (bench/floor.py); corral at CS-4's ``direct`` depth with
tracing on, every process's spans stored in PostgreSQL *and* exported over OTLP/HTTP to a
local receiver (bench/otlp_sink.py, a process of its own, not counted: a collector is not
corral); and the same with ``telemetry.enabled: false``. Both corral stacks run the API
beside the team, hold ``--stored`` (10,000) conversations before the run starts, and
throughout the concurrent phase an operator's console reads its conversation list
(``GET /v1/console/conversations``, the newest 100) every ``--read-every`` seconds.

Reported for each run: the traced stack against the floor (CS-4's targets: at least 0.5x
the floor's throughput and at most 2x its sequential p50, in the same run), what tracing
costs in CPU per conversation (traced minus untraced, both phases), the spans that reached
the collector, and the console list's latency (p50, p95, max) during the concurrent phase
(target: p95 under 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._phases import RunFigures, Sizes, add_size_arguments, run_phases, sizes_of
from bench.cs4 import Corral, _ratios, _summary, machine, phase_json, run_floor

STORED = 10_000
"""Conversations already in PostgreSQL when a run starts (the console's list reads past them)."""


async def store_conversations(dsn: str, count: int) -> None:
    """``count`` ended conversations of the past week (one a minute), each with its model
    answers journaled, as the supervisor and the model gateway record them."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO conversations (id, customer, text, status, current_agent, step, path, reply,"
            " created_at, updated_at)"
            " SELECT 'old-' || lpad(n::text, 6, '0'), 'cus_old', 'Please refund my order', 'replied',"
            " 'account_manager', 3,"
            ' \'[{"agent": "triage"}, {"agent": "payments"}, {"agent": "account_manager"}]\'::jsonb,'
            " 'Refund issued.', now() - n * interval '60 seconds', now() - n * interval '60 seconds'"
            " FROM generate_series(1, $1) AS n",
            count,
        )
        # Their spend is their journaled model answers (conversation_spend sums them).
        await conn.execute(
            "INSERT INTO step_journal (conversation, step, idx, agent, text, model, input_tokens,"
            " output_tokens, cost_usd, created_at)"
            " SELECT 'old-' || lpad(n::text, 6, '0'), step, 0, agent, 'scripted', 'scripted/support', 400,"
            " 100, 0.001, now() - n * interval '60 seconds'"
            " FROM generate_series(1, $1) AS n,"
            " unnest(ARRAY[1, 2, 3], ARRAY['triage', 'payments', 'account_manager']) AS s(step, agent)",
            count,
        )
        await conn.execute("ANALYZE conversations; ANALYZE step_journal")
    finally:
        await conn.close()


class ConsoleCorral(Corral):
    """CS-4's ``direct`` stack with the API and its console, ``STORED`` older conversations,
    an operator's key, and tracing on (exported to ``collector``) or off."""

    def __init__(self, workdir: Path, *, traced: bool, collector: str | None, stored: int) -> None:
        overrides = {"api": {"enabled": True, "port": 0}, "telemetry": {"enabled": traced}}
        environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector} if traced and collector else {}
        super().__init__(workdir, "direct", overrides=overrides, environment=environment)
        self._stored = stored
        self._http: httpx.AsyncClient | None = None
        self.list_seconds: list[float] = []

    async def start(self, conversations: int) -> None:
        await super().start(conversations)
        runtime = await self.api_ready()
        await store_conversations(self.database_url, self._stored)
        key = await self.api_key("console", operator=True)
        self._http = httpx.AsyncClient(
            base_url=runtime["api_url"], headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    async def read_console(self, every_s: float) -> None:
        """The console's conversation list, once every ``every_s``, until cancelled."""
        http = self._http
        assert http is not None
        while True:
            started = time.perf_counter()
            listed = await http.get("/v1/console/conversations")
            seconds = time.perf_counter() - started
            if listed.status_code != 200 or len(listed.json()["items"]) != 100:
                raise RuntimeError(f"the console's list: {listed.status_code} {listed.text[:300]}")
            self.list_seconds.append(seconds)
            await asyncio.sleep(max(every_s - seconds, 0.0))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await super().stop()


class Collector:
    """bench/otlp_sink.py in its own process."""

    def __init__(self, workdir: Path) -> None:
        self._port_file = workdir / "sink.port"
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self) -> None:
        self._port_file.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(self._port_file)]
        )
        deadline = time.monotonic() + 30
        while not self._port_file.exists() or not self._port_file.read_text():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("the OTLP sink did not start")
            await asyncio.sleep(0.05)
        self.url = f"http://127.0.0.1:{self._port_file.read_text()}"

    async def received(self) -> int:
        async with httpx.AsyncClient() as http:
            return int((await http.get(f"{self.url}/count")).text)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(10)


async def run_stack(
    workdir: Path, sizes: Sizes, *, traced: bool, stored: int, read_every_s: float
) -> tuple[RunFigures, dict[str, Any]]:
    """One corral run; its figures, and the console's and the collector's."""
    collector = Collector(workdir) if traced else None
    if collector is not None:
        await collector.start()
    corral = ConsoleCorral(
        workdir, traced=traced, collector=collector.url if collector else None, stored=stored
    )
    extra: dict[str, Any] = {}
    try:
        await corral.start(sizes.total)
        figures = await run_phases(
            corral.converse,
            corral.processes(),
            sizes,
            beside_concurrent=lambda: corral.read_console(read_every_s),
        )
        refunds, orders = await corral.refunds()
        if refunds != sizes.total or orders != sizes.total:
            raise RuntimeError(f"{refunds} refunds of {orders} orders for {sizes.total} conversations")
        if collector is not None:
            extra["spans_stored"], extra["spans_exported"] = await _settled(corral, collector)
    finally:
        await corral.stop()  # the supervisor exports what it still holds before it exits
        if collector is not None:
            collector.stop()
    extra["console_list"] = _latencies(corral.list_seconds)
    return figures, extra


async def _settled(corral: ConsoleCorral, collector: Collector, timeout_s: float = 60.0) -> tuple[int, int]:
    """The spans stored and those the collector received, once every process has sent its
    own (the store holds the same count twice in a row, a second apart) and the collector has
    all of them."""
    conn = await asyncpg.connect(corral.database_url)
    try:
        deadline = time.monotonic() + timeout_s
        last = -1
        while True:
            stored = int(await conn.fetchval("SELECT count(*) FROM spans"))
            received = await collector.received()
            if (stored == last and received >= stored) or time.monotonic() > deadline:
                return stored, received
            last = stored
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


def _latencies(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"reads": 0}
    return {
        "reads": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
        "max_ms": round(ms[-1], 1),
    }


def _tracing_cost(traced: RunFigures, untraced: RunFigures) -> dict[str, float]:
    """CPU per conversation that tracing adds (both stacks alike but for telemetry)."""
    return {
        "seq_cpu_ms_per_conversation": round(
            traced.sequential.cpu_ms_per_conversation - untraced.sequential.cpu_ms_per_conversation, 2
        ),
        "conc_cpu_ms_per_conversation": round(
            traced.concurrent.cpu_ms_per_conversation - untraced.concurrent.cpu_ms_per_conversation, 2
        ),
    }


async def benchmark(
    runs: int, sizes: Sizes, stored: int, read_every_s: float, workdir: Path
) -> dict[str, Any]:
    per_run: list[dict[str, Any]] = []
    for run in range(1, runs + 1):
        print(f"run {run}/{runs}: floor", flush=True)
        floor = await run_floor(workdir / f"run{run}-floor", sizes)
        print(f"run {run}/{runs}: corral, traced and exported", flush=True)
        traced, traced_extra = await run_stack(
            workdir / f"run{run}-traced", sizes, traced=True, stored=stored, read_every_s=read_every_s
        )
        print(f"run {run}/{runs}: corral, telemetry off", flush=True)
        untraced, untraced_extra = await run_stack(
            workdir / f"run{run}-untraced", sizes, traced=False, stored=stored, read_every_s=read_every_s
        )
        ratios = _ratios(_summary([traced]), _summary([floor]))
        per_run.append(
            {
                "targets_met": ratios["throughput"] >= 0.5
                and ratios["seq_p50"] <= 2
                and traced_extra["console_list"].get("p95_ms", 0) < 1000,
                "ratios": ratios,
                "untraced_ratios": _ratios(_summary([untraced]), _summary([floor])),
                "tracing_cost": _tracing_cost(traced, untraced),
                "traced": {**traced_extra, **_phases(traced)},
                "untraced": {**untraced_extra, **_phases(untraced)},
                "floor": _phases(floor),
            }
        )
    return {
        "workload": "CS-4-TRACED",
        "machine": machine(),
        "sizes": {**sizes.__dict__, "stored": stored, "read_every_s": read_every_s},
        "runs": per_run,
    }


def _phases(figures: RunFigures) -> dict[str, Any]:
    return {"sequential": phase_json(figures.sequential), "concurrent": phase_json(figures.concurrent)}


def table(report: dict[str, Any]) -> str:
    lines = [f"CS-4-TRACED, {len(report['runs'])} run(s); {report['sizes']['stored']} stored conversations"]
    for i, run in enumerate(report["runs"], 1):
        r, u, cost = run["ratios"], run["untraced_ratios"], run["tracing_cost"]
        seen, unseen = run["traced"]["console_list"], run["untraced"]["console_list"]
        lines += [
            f"run {i}: traced vs floor: throughput x{r['throughput']:.2f} (>= 0.5),"
            f" seq p50 x{r['seq_p50']:.2f} (<= 2), CPU {r['cpu_ms_per_conversation']:.2f} ms/conv;"
            f" untraced x{u['throughput']:.2f}, x{u['seq_p50']:.2f},"
            f" {u['cpu_ms_per_conversation']:.2f} ms/conv",
            f"       tracing costs {cost['conc_cpu_ms_per_conversation']:.2f} ms CPU/conv concurrent,"
            f" {cost['seq_cpu_ms_per_conversation']:.2f} sequential;"
            f" {run['traced'].get('spans_exported', 0)} spans exported"
            f" ({run['traced'].get('spans_stored', 0)} stored)",
            f"       console list (traced): {seen.get('reads', 0)} reads,"
            f" p50 {seen.get('p50_ms', 0):.0f} ms, p95 {seen.get('p95_ms', 0):.0f} ms (< 1000),"
            f" max {seen.get('max_ms', 0):.0f} ms; untraced p95 {unseen.get('p95_ms', 0):.0f} ms",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, runs=3)
    parser.add_argument("--stored", type=int, default=STORED, help="conversations stored before the run")
    parser.add_argument("--read-every", type=float, default=0.5, help="seconds between console reads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="corral-cs4-traced-"))
    try:
        report = asyncio.run(benchmark(args.runs, sizes_of(args), args.stored, args.read_every, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    missed = [i for i, run in enumerate(report["runs"], 1) if not run["targets_met"]]
    print(f"targets missed in run(s) {missed}" if missed else "targets met in every run")


if __name__ == "__main__":
    main()

"""CS-4-HTTP: CS-4 entered through the HTTP API, each conversation's end read from its SSE
stream, beside CS-4 through the NATS client in the same run.

    python bench/cs4_http.py                      # CS-4 sizes, one run of each
    python bench/cs4_http.py --runs 3 --json http.json

The same team, rules, orders and checks as CS-4's ``direct`` depth. A conversation is
``POST /v1/conversations`` (answered once the supervisor recorded it) with a backend key
(one client, every conversation naming its customer), then ``GET …/events`` until
``conversation.ended``; it counts only with CS-4's exact reply and path. The API process is
measured with the rest of corral; the load generator (this process, httpx) is not. The
report gives both workloads' figures and what the HTTP hop adds: latency and CPU per
conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._phases import Sizes, add_size_arguments, run_phases, sizes_of
from bench.cs4 import TEAM, Corral, _customer, _order, machine, phase_json


class HttpCorral(Corral):
    """``bench.cs4.Corral`` with the API beside it, driven over HTTP and SSE."""

    def __init__(self, workdir: Path, *, in_flight: int) -> None:
        # One backend key carries the whole load: no rate limit in its way.
        api = {"enabled": True, "port": 0, "rate_per_s": 1e6, "burst": 100_000}
        super().__init__(workdir, "direct", overrides={"api": api})
        self._in_flight = in_flight
        self._http: httpx.AsyncClient | None = None

    async def start(self, conversations: int) -> None:
        await super().start(conversations)
        runtime = await self.api_ready()
        key = await self.api_key("cs4")
        self._http = httpx.AsyncClient(
            base_url=runtime["api_url"],
            headers={"Authorization": f"Bearer {key}"},
            timeout=self.timeout_s,
            limits=httpx.Limits(max_connections=2 * self._in_flight + 10),
        )

    async def converse(self, n: int) -> None:
        """Conversation ``n`` over HTTP; raises unless it ended with the expected reply."""
        http = self._http
        assert http is not None
        started = await http.post(
            "/v1/conversations",
            json={"text": f"Please refund order {_order(n)}; I was charged twice.", "customer": _customer(n)},
        )
        if started.status_code not in (201, 202):
            raise RuntimeError(f"start {n}: {started.status_code} {started.text}")
        conversation = started.json()["conversation"]
        ended: dict[str, Any] | None = None
        kind = ""
        async with http.stream("GET", f"/v1/conversations/{conversation}/events") as events:
            async for line in events.aiter_lines():
                if line.startswith("event:"):
                    kind = line.partition(":")[2].strip()
                elif line.startswith("data:") and kind == "conversation.ended":
                    ended = json.loads(line.partition(":")[2])
                    break
        expected = f"Refund of order {_order(n)} issued."
        path = [hop["agent"] for hop in (ended or {}).get("path", [])]
        if ended is None or ended["status"] != "replied" or ended["reply"] != expected or path != list(TEAM):
            raise RuntimeError(f"{conversation} ended {ended!r}")

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await super().stop()


async def _run(corral: Corral, sizes: Sizes) -> dict[str, Any]:
    try:
        await corral.start(sizes.total)
        figures = await run_phases(corral.converse, corral.processes(), sizes)
        refunds, orders = await corral.refunds()
    finally:
        await corral.stop()
    return {
        "sequential": phase_json(figures.sequential),
        "concurrent": phase_json(figures.concurrent),
        "refunds": refunds,
        "refunded_orders": orders,
        "orders": sizes.total,
    }


def _hop(nats: dict[str, Any], http: dict[str, Any]) -> dict[str, float]:
    """What entering through HTTP adds to a conversation."""
    return {
        "seq_p50_ms": round(http["sequential"]["p50_ms"] - nats["sequential"]["p50_ms"], 2),
        "conc_cpu_ms_per_conversation": round(
            http["concurrent"]["cpu_ms_per_conversation"] - nats["concurrent"]["cpu_ms_per_conversation"], 2
        ),
        "api_cpu_ms_per_conversation": http["concurrent"]["cpu_ms_by_process"].get("api", 0.0),
        "throughput_ratio": round(http["concurrent"]["per_second"] / nats["concurrent"]["per_second"], 3)
        if nats["concurrent"]["per_second"]
        else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, runs=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sizes = sizes_of(args)
    runs = []
    for run in range(1, args.runs + 1):
        report: dict[str, Any] = {}
        for name in ("nats", "http"):
            workdir = Path(tempfile.mkdtemp(prefix=f"corral-cs4-{name}-"))
            try:
                print(f"run {run}/{args.runs}: CS-4 through {name}", flush=True)
                corral = (
                    Corral(workdir, "direct")
                    if name == "nats"
                    else HttpCorral(workdir, in_flight=args.in_flight)
                )
                report[name] = asyncio.run(_run(corral, sizes))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        report["http_hop"] = _hop(report["nats"], report["http"])
        runs.append(report)
    for report in runs:
        for name in ("nats", "http"):
            seq, conc = report[name]["sequential"], report[name]["concurrent"]
            print(
                f"{name:>5}: seq p50 {seq['p50_ms']:.1f} ms, p99 {seq['p99_ms']:.1f}; "
                f"{conc['per_second']:.0f} conv/s; "
                f"CPU {conc['cpu_ms_per_conversation']:.2f} ms/conv; PSS {conc['pss_mb']:.0f} MB; "
                f"{report[name]['refunds']} refunds of {report[name]['orders']} orders"
            )
        hop = report["http_hop"]
        print(
            f"the HTTP hop: +{hop['seq_p50_ms']:.1f} ms at the sequential p50, "
            f"+{hop['conc_cpu_ms_per_conversation']:.2f} ms of CPU per conversation "
            f"(the API process {hop['api_cpu_ms_per_conversation']:.2f}), "
            f"throughput x{hop['throughput_ratio']:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"workload": "CS-4-HTTP", "machine": machine(), "runs": runs}, indent=2) + "\n"
        )
    if any(
        r[n]["refunds"] != r[n]["orders"] or r[n]["refunded_orders"] != r[n]["orders"]
        for r in runs
        for n in ("nats", "http")
    ):
        sys.exit("refunds do not match conversations")


if __name__ == "__main__":
    main()

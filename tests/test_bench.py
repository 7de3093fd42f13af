"""The CS-4 benchmark, small, as a user runs it: both depths and the floor, every
conversation verified and every refund counted. Never a time: speed lives in bench/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_a_small_cs4_run_completes_every_conversation_and_refunds_each_once(tmp_path: Path) -> None:
    out = tmp_path / "cs4.json"
    sizes = ["--warmup", "2", "--sequential", "4", "--concurrent", "12", "--in-flight", "6"]
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cs4.py"), "--runs", "1", *sizes, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["hops"] == 8 and len(report["hop_names"]) == 8
    for depth in ("direct", "litellm"):
        figures = report[depth]
        # A conversation counts only with its exact reply and path (bench/cs4.py checks).
        assert figures["conversations"] == 18
        assert figures["refunds"] == 18 and figures["refunded_orders"] == 18
        (phases,) = report["per_run"][depth]
        assert phases["sequential"]["conversations"] == 4
        assert phases["concurrent"]["conversations"] == 12
        assert phases["concurrent"]["cpu_ms_by_process"].keys() >= {
            "supervisor",
            "agent triage",
            "agent payments",
            "agent account_manager",
            "nats-server",
            "postgres",
        }
    assert report["per_run"]["floor"][0]["concurrent"]["conversations"] == 12
    assert report["ratios"]["throughput"] > 0 and report["ratios"]["seq_p50"] > 0
    assert report["ratios"]["cpu_vs_floor"] > 0
    assert [r.keys() for r in report["ratios_per_run"]] == [report["ratios"].keys()]
    assert "8 durable hops" in run.stdout and "corral, scripted direct" in run.stdout

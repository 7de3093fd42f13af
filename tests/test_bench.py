"""The CS-4 benchmarks, small, as a user runs them: the depths and the floor, CS-4-slow,
every conversation verified and every refund counted. Never a speed: it lives in bench/
(only what must hold on any machine: a conversation waits on its model calls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


def _bench(
    tmp_path: Path, script: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``bench/<script>`` as a user does, in ``tmp_path``; its output and JSON report."""
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run, json.loads(out.read_text())


def test_a_small_cs4_run_completes_every_conversation_and_refunds_each_once(tmp_path: Path) -> None:
    sizes = ["--warmup", "2", "--sequential", "4", "--concurrent", "12", "--in-flight", "6"]
    run, report = _bench(tmp_path, "cs4.py", "--runs", "1", *sizes)
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


def test_the_http_depth_answers_through_the_openai_server_and_reports_it_apart(tmp_path: Path) -> None:
    sizes = ["--warmup", "2", "--sequential", "3", "--concurrent", "6", "--in-flight", "3", "--depth", "http"]
    run, report = _bench(tmp_path, "cs4.py", "--runs", "1", *sizes)
    assert "direct" not in report and "ratios" not in report
    http = report["http"]
    assert http["conversations"] == 11 and http["refunds"] == 11 and http["refunded_orders"] == 11
    (phases,) = report["per_run"]["http"]
    concurrent = phases["concurrent"]
    # The model gateway is corral's (it calls litellm); the OpenAI server is not.
    assert "router" in concurrent["cpu_ms_by_process"] and "router" in concurrent["pss_mb_by_process"]
    assert "provider" not in concurrent["cpu_ms_by_process"]
    assert "provider" not in concurrent["pss_mb_by_process"]
    assert concurrent["provider_pss_mb"] > 0 and concurrent["provider_cpu_ms_per_conversation"] >= 0
    assert concurrent["pss_mb"] == pytest.approx(sum(concurrent["pss_mb_by_process"].values()), abs=0.5)
    assert http["provider_pss_mb"] > 0
    assert "corral, scripted http" in run.stdout and "OpenAI server" in run.stdout


def test_cs4_slow_keeps_every_conversation_waiting_on_the_model_and_reports_the_bound(tmp_path: Path) -> None:
    sizes = ["--conversations", "8", "--in-flight", "4", "--delay-s", "0.2", "--warmup", "2"]
    run, report = _bench(tmp_path, "cs4_slow.py", *sizes)
    assert report["bound_per_second"] == 5.0  # 4 in flight / (4 calls x 0.2 s)
    assert report["refunds"] == report["refunded_orders"] == report["orders"] == 10
    phase = report["phase"]
    assert phase["conversations"] == 8
    # Four model calls of 0.2 s each, one after the other: no conversation is quicker.
    assert phase["p50_ms"] >= 800 and phase["p99_ms"] >= phase["p50_ms"]
    assert 0 < report["vs_bound"] <= 1.0
    assert report["per_second"] == pytest.approx(report["vs_bound"] * 5.0, rel=0.05)
    # Every call reached the server, the warm-up's included: 4 per conversation.
    assert report["server"]["served"] >= 4 * 10 and 1 <= report["server"]["peak_in_flight"] <= 4
    assert phase["cpu_ms_by_process"].keys() >= {"router", "supervisor", "agent payments", "nats-server"}
    assert phase["pss_mb_by_process"]["router"] > 0
    assert "provider_cpu_ms_per_conversation" in phase
    assert "against the bound" in run.stdout


def test_cs4_mt_holds_three_turns_per_conversation_and_refunds_each_once(tmp_path: Path) -> None:
    sizes = ["--warmup", "2", "--sequential", "3", "--concurrent", "8", "--in-flight", "4"]
    run, report = _bench(tmp_path, "cs4_mt.py", *sizes)
    assert report["workload"] == "CS-4-MT"
    (figures,) = report["runs"]
    # Each conversation counts only once all three of its turns settled as expected.
    assert figures["sequential"]["conversations"] == 3 and figures["concurrent"]["conversations"] == 8
    assert figures["refunds"] == figures["orders"] == figures["refunded_orders"] == 13
    assert figures["sequential_turn_p50_ms"] > 0
    assert "13 refunds of 13 orders" in run.stdout


def test_cs4_http_enters_through_the_api_and_reads_each_end_from_sse(tmp_path: Path) -> None:
    sizes = ["--warmup", "2", "--sequential", "3", "--concurrent", "8", "--in-flight", "4"]
    run, report = _bench(tmp_path, "cs4_http.py", *sizes)
    assert report["workload"] == "CS-4-HTTP"
    (figures,) = report["runs"]
    for name in ("nats", "http"):
        assert figures[name]["refunds"] == figures[name]["orders"] == figures[name]["refunded_orders"] == 13
    # The API process is measured with corral's, apart from the load generator.
    assert "api" in figures["http"]["concurrent"]["cpu_ms_by_process"]
    assert "api" not in figures["nats"]["concurrent"]["cpu_ms_by_process"]
    assert "the HTTP hop: +" in run.stdout


def test_cs4_traced_exports_spans_reads_the_console_and_prices_tracing(tmp_path: Path) -> None:
    sizes = ["--warmup", "2", "--sequential", "3", "--concurrent", "10", "--in-flight", "5"]
    run, report = _bench(
        tmp_path, "cs4_traced.py", "--runs", "1", "--stored", "300", "--read-every", "0.1", *sizes
    )
    (only,) = report["runs"]
    # Every conversation's spans were stored and reached the collector (a turn, decisions,
    # steps, model attempts, tool calls, handoffs: 15 a conversation).
    assert only["traced"]["spans_stored"] >= 15 * 15
    assert only["traced"]["spans_exported"] == only["traced"]["spans_stored"]
    assert "spans_exported" not in only["untraced"]
    for stack in ("traced", "untraced"):
        assert only[stack]["console_list"]["reads"] >= 1
        assert only[stack]["concurrent"]["conversations"] == 10
    assert "api" in only["traced"]["concurrent"]["cpu_ms_by_process"]
    assert set(only["tracing_cost"]) == {"seq_cpu_ms_per_conversation", "conc_cpu_ms_per_conversation"}
    assert "tracing costs" in run.stdout and "console list" in run.stdout

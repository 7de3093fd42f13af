"""Anomaly alerts: the detectors on their own (a rate against its baseline, a call repeated,
a retry storm, a cost outlier), then under `corral up`: a model scripted to hammer a tool
raises the rate alert, and with ``alerts.auto_kill`` the agent is killed, as `corral
status` shows (with the alert), the audit chain records (by ``corral-alerts``) and the
console's alerts list says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from corral.bus import (
    Alert,
    Attempt,
    BusConfig,
    ChatTurn,
    ModelAnswer,
    ModelCall,
    connect,
    request,
    subjects,
)
from corral.router import Completion, CompletionRequest, ModelGateway, RouterError
from corral.supervisor import EmbeddedNats, start_conversation
from corral.supervisor.config._sections import AlertsSection
from corral.supervisor.core._alert_watch import retry_storm_observer
from corral.supervisor.core._anomalies import CostWatch, RetryStormWatch, ToolCallWatch
from tests.conftest import eventually
from tests.model_gateway import AdmitAll
from tests.stack import Stack, running_stack, sample_team

# --- the detectors -------------------------------------------------------------------------


def test_a_burst_far_above_the_baseline_is_one_rate_alert() -> None:
    section = AlertsSection(window_s=10, baseline_windows=5, tool_rate_factor=4, tool_rate_min_calls=5)
    watch = ToolCallWatch(section)
    at = 1000.0
    # Five windows of three calls each: the baseline is 3 per window.
    for window in range(5):
        for i in range(3):
            assert (
                watch.observe("payments", f"c{window}{i}", "refund", f"d{window}{i}", at + window * 10 + i)
                == []
            )
    at += 50
    raised = [a for i in range(20) for a in watch.observe("payments", "cx", "lookup", f"x{i}", at + i * 0.1)]
    assert watch.baseline("payments") == pytest.approx(3.0)
    assert [a.kind for a in raised] == ["tool_rate"]  # at 12 calls (4x 3), and once
    assert raised[0].agent == "payments" and "12 tool calls within 10 s" in raised[0].reason


def test_a_rate_within_the_baseline_raises_nothing() -> None:
    watch = ToolCallWatch(
        AlertsSection(window_s=1, baseline_windows=3, tool_rate_factor=3, tool_rate_min_calls=5)
    )
    raised = []
    for second in range(30):
        for i in range(8):  # 8 a window, every window: busy, but its own normal
            raised += watch.observe("triage", f"c{second}", "lookup", f"{second}-{i}", 10.0 + second + i / 10)
    kinds = [a.kind for a in raised]
    assert kinds == ["tool_rate"]  # the first window only: no baseline yet, and 8 >= 5
    assert watch.baseline("triage") == pytest.approx(8.0)


def test_the_same_call_repeated_is_an_alert_once() -> None:
    watch = ToolCallWatch(AlertsSection(repeated_calls=3, tool_rate_min_calls=100))
    raised = [a for i in range(6) for a in watch.observe("triage", "c1", "lookup_order", "same", 5.0 + i)]
    assert [a.kind for a in raised] == ["repeated_call"]
    assert "lookup_order with the same arguments 3 times in c1" in raised[0].reason
    assert watch.observe("triage", "c2", "lookup_order", "same", 20.0) == []  # another conversation


def test_failed_attempts_toward_a_model_are_a_retry_storm() -> None:
    watch = RetryStormWatch(AlertsSection(window_s=10, retry_storm_failures=4))
    assert watch.observe("gpt-x", "payments", "ok", 1.0) == []
    # Three failures, then a quiet spell: the window forgets them.
    assert [watch.observe("gpt-x", "payments", "RateLimitError", 1.0 + i) for i in range(3)] == [[], [], []]
    assert watch.observe("gpt-x", "triage", "Timeout", 30.0) == []
    raised = [a for i in range(3) for a in watch.observe("gpt-x", "payments", "RateLimitError", 31.0 + i)]
    assert [(a.kind, a.model, a.agent) for a in raised] == [("retry_storm", "gpt-x", "payments")]
    assert "4 failed attempts toward gpt-x within 10 s" in raised[0].reason


def test_a_conversation_far_above_its_paths_median_is_a_cost_outlier() -> None:
    watch = CostWatch(AlertsSection(cost_factor=5, cost_min_samples=5))
    path = "triage -> payments -> account_manager"
    for i in range(5):
        assert watch.observe(f"c{i}", path, 0.01 + i * 0.001, 1.0) == []
    assert watch.observe("cheap", "triage", 1.0, 2.0) == []  # another path, no median yet
    assert watch.observe("normal", path, 0.04, 2.0) == []
    raised = watch.observe("dear", path, 0.5, 3.0)
    assert [(a.kind, a.conversation) for a in raised] == [("cost_outlier", "dear")]
    assert "40.0x the median $0.0125 of 6 conversations" in raised[0].reason


# --- under corral up ---------------------------------------------------------------------------

HAMMER = "Look up my order 1001 again and again"
RULES = [
    {
        "when": ["tool lookup_order ->"],
        "answer": {"action": "tool", "tool": "lookup_order", "arguments": {"order_id": "1001"}},
    },
    {
        "when": ["again and again"],
        "answer": {"action": "tool", "tool": "lookup_order", "arguments": {"order_id": "1001"}},
    },
]
"""A hostile triage model: it calls lookup_order, and again on every answer."""


def _hostile_team(directory: Path) -> Path:
    config = sample_team(
        directory,
        {
            "conversation": {"max_same_tool_calls": 500},
            "alerts": {
                "window_s": 60,
                "tool_rate_min_calls": 12,
                "repeated_calls": 4,
                "auto_kill": ["tool_rate"],
            },
        },
    )
    loaded = yaml.safe_load(config.read_text())
    loaded["agents"]["triage"]["max_tool_calls"] = 200
    config.write_text(yaml.safe_dump(loaded, sort_keys=False))
    scripted = directory / "scripted.yaml"
    rules = yaml.safe_load(scripted.read_text())
    rules["agents"]["triage"] = RULES + rules["agents"]["triage"]
    scripted.write_text(yaml.safe_dump(rules, sort_keys=False))
    return config


@pytest.fixture(scope="module")
async def hostile(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.conftest import _fresh_database

    config = _hostile_team(tmp_path_factory.mktemp("alerts") / "support")
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(tmp_path_factory.mktemp("state"), database, None, config) as stack:
        yield stack


def _status(stack: Stack) -> dict[str, Any]:
    shown = stack.corral("status", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


async def test_a_burst_of_tool_calls_raises_the_rate_alert_and_auto_kill_kills_the_agent(
    hostile: Stack,
) -> None:
    client = await hostile.connect()
    try:
        conversation = await start_conversation(client, HAMMER, customer="cus_1001")
    finally:
        await client.close()

    async def alerted() -> list[Any] | None:
        rows = await hostile.sql("SELECT kind, agent, conversation, reason, action FROM alerts ORDER BY id")
        kinds = {r["kind"] for r in rows}
        return rows if {"tool_rate", "repeated_call"} <= kinds else None

    rows = await eventually(alerted, timeout=60, message="the rate and repeat alerts are stored")
    rate = next(r for r in rows if r["kind"] == "tool_rate")
    assert (rate["agent"], rate["conversation"], rate["action"]) == ("triage", conversation, "killed triage")
    repeat = next(r for r in rows if r["kind"] == "repeated_call")
    assert repeat["action"] == ""  # not a kind the config kills on
    assert "lookup_order with the same arguments" in repeat["reason"]

    # The kill is the operators' own: on the switch, in the audit chain, in `corral status`.
    async def killed() -> dict[str, Any] | None:
        report = await asyncio.to_thread(_status, hostile)
        triage = next(p for p in report["processes"] if p["name"] == "triage")
        return report if triage["state"] == "killed" else None

    report = await eventually(killed, timeout=60, message="corral status shows triage killed")
    triage = next(p for p in report["processes"] if p["name"] == "triage")
    assert triage["killed"]["by"] == "corral-alerts"
    assert triage["killed"]["reason"].startswith("auto-kill on tool_rate: triage made")
    assert {"kind": "tool_rate", "agent": "triage", "action": "killed triage"}.items() <= next(
        a for a in report["alerts"] if a["kind"] == "tool_rate"
    ).items()
    audited = await hostile.sql("SELECT agent, action, outcome FROM audit_log WHERE action = 'kill.agent'")
    assert [(a["agent"], a["outcome"]) for a in audited] == [("corral-alerts", "applied")]

    shown = hostile.corral("status")
    assert "killed triage" in shown.stdout and "tool_rate" in shown.stdout, shown.stdout

    # The console lists it, through the API, with an operator's key.
    made = hostile.corral("api-key", "create", "--client", "desk", "--operator", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    runtime = hostile.runtime()
    assert runtime is not None
    async with httpx.AsyncClient(base_url=runtime["api_url"], timeout=30) as api:
        listed = await api.get(
            "/v1/console/alerts", headers={"Authorization": f"Bearer {json.loads(made.stdout)['key']}"}
        )
    assert listed.status_code == 200, listed.text
    console = {a["kind"]: a for a in listed.json()["items"]}
    assert console["tool_rate"]["action"] == "killed triage" and console["tool_rate"]["agent"] == "triage"


# --- a retry storm, at the model gateway ---------------------------------------------------------


class _Failing:
    """A model whose provider rate-limits every attempt (three a call, as litellm retries)."""

    async def complete(self, request: CompletionRequest) -> Completion:
        attempts = [Attempt(model="openai/gpt-x", outcome="RateLimitError", seconds=0.01)] * 3
        raise RouterError("rate limited", model="openai/gpt-x", attempts=attempts)


async def test_failed_attempts_toward_a_model_raise_a_retry_storm_alert_from_the_gateway(
    nats_server: EmbeddedNats,
) -> None:
    gateway_bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    payments = await connect(
        BusConfig(
            servers=[nats_server.url], identity=subjects.agent_identity("payments"), reconnect_forever=False
        )
    )
    alerts: asyncio.Queue[Alert] = asyncio.Queue()

    async def heard(msg: Any) -> None:
        await alerts.put(msgspec.json.decode(msg.data, type=Alert))

    await gateway_bus.nc.subscribe(subjects.alerts(), cb=heard)
    section = AlertsSection(window_s=60, retry_storm_failures=6)
    observer = retry_storm_observer(gateway_bus.nc, section)
    tiers = {"payments": frozenset({"fast"})}
    try:
        async with ModelGateway(
            gateway_bus.nc, {"fast": _Failing()}, AdmitAll(), tiers, {}, on_attempts=observer
        ):
            for index in range(3):
                call = ModelCall(
                    conversation="c1",
                    step=1,
                    index=index,
                    agent="payments",
                    tier="fast",
                    messages=[ChatTurn(role="user", content="hi")],
                )
                answer = await request(
                    payments.nc, subjects.agent_model("payments"), call, ModelAnswer, timeout_s=10
                )
                assert answer.status == "failed"
            alert = await asyncio.wait_for(alerts.get(), timeout=10)
    finally:
        await payments.close()
        await gateway_bus.close()
    assert (alert.kind, alert.model, alert.agent) == ("retry_storm", "openai/gpt-x", "payments")
    assert "6 failed attempts toward openai/gpt-x within 60 s" in alert.reason
    assert alerts.empty()  # one storm, one alert (the third call's failures are quiet)

"""Durable steps: kill an agent mid-step and lose nothing, do nothing twice; budgets and
loop breakers stop runaway conversations; replicas share an agent's work.

A variant of the sample team runs here: short ack_wait (so redelivery is quick), a model
that counts its calls in a file, rules that think slowly, cost money or loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.supervisor import send_and_wait
from tests.conftest import SAMPLE_CONFIG, eventually
from tests.stack import Stack, running_stack

RULES: dict[str, Any] = {
    "calls_log": "calls.jsonl",
    "agents": {
        "triage": [
            {
                "when": ["tool create_ticket ->"],
                "answer": {"action": "tool", "tool": "create_ticket", "arguments": {"subject": "help"}},
            },
            {
                "when": ["tool lookup_customer ->"],
                "answer": {"action": "tool", "tool": "lookup_customer", "arguments": {}},
                "cost_usd": 0.02,
            },
            {
                "when": ["runaway tool"],
                "answer": {"action": "tool", "tool": "create_ticket", "arguments": {"subject": "help"}},
            },
            {
                "when": ["expensive"],
                "answer": {"action": "tool", "tool": "lookup_customer", "arguments": {}},
                "cost_usd": 0.02,
            },
            {"when": ["bounce"], "answer": {"action": "handoff", "target": "payments", "confidence": 0.9}},
            {"when": ["refund"], "answer": {"action": "handoff", "target": "payments", "confidence": 0.93}},
            {"answer": {"action": "handoff", "target": "account_manager", "confidence": 0.9}},
        ],
        "payments": [
            # The second call of the step "thinks" for a while: long enough to kill it.
            {
                "when": ["tool refund -> ok"],
                "sleep_s": 4,
                "answer": {
                    "action": "handoff",
                    "target": "account_manager",
                    "confidence": 0.91,
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
            {"when": ["bounce"], "answer": {"action": "handoff", "target": "triage", "confidence": 0.9}},
            {
                "when": ["refund"],
                "answer": {
                    "action": "tool",
                    "tool": "refund",
                    "arguments": {"order_id": "1001", "amount_cents": 4000},
                },
            },
            {"answer": {"action": "handoff", "target": "account_manager", "confidence": 0.9}},
        ],
        "tech_support": [{"answer": {"action": "reply", "text": "ok", "confidence": 0.9}}],
        "account_manager": [{"answer": {"action": "reply", "text": "done", "confidence": 0.9}}],
    },
}


@pytest.fixture(scope="module")
async def team(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.conftest import _fresh_database

    directory = tmp_path_factory.mktemp("durable") / "support"
    shutil.copytree(SAMPLE_CONFIG.parent, directory)
    (directory / "scripted.yaml").write_text(yaml.safe_dump(RULES))
    config = yaml.safe_load((directory / "corral.yaml").read_text())
    config["nats"] = {"ack_wait_s": 2}
    config["graph"]["edges"]["payments"] = ["account_manager", "triage"]
    config["agents"]["triage"]["tools"] = ["lookup_customer", "create_ticket"]
    config["agents"]["account_manager"]["replicas"] = 2
    config["conversation"] = {"max_steps": 20, "max_usd": 0.05, "max_same_tool_calls": 3, "max_pingpong": 3}
    (directory / "corral.yaml").write_text(yaml.safe_dump(config))
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(
        tmp_path_factory.mktemp("state"), database, None, directory / "corral.yaml"
    ) as stack:
        yield stack


def _calls(stack: Stack, conversation: str, agent: str) -> int:
    log = Path(stack.config).parent / "calls.jsonl"
    if not log.exists():
        return 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(1 for c in lines if c["conversation"] == conversation and c["agent"] == agent)


async def test_killed_mid_step_the_redelivery_replays_instead_of_calling_again(team: Stack) -> None:
    client = await team.connect()
    conversation = "c-kill-mid-step"
    payments = team.child("payments")
    finished = asyncio.create_task(
        send_and_wait(client, "please refund", customer="cus_1001", conversation=conversation, timeout_s=90)
    )

    async def _in_second_call() -> bool:
        # The first call answered (journaled) and the refund applied: payments now thinks.
        if _calls(team, conversation, "payments") != 1:
            return False
        return bool(await team.sql("SELECT 1 FROM shop.refunds WHERE order_id='1001'"))

    await eventually(_in_second_call, message="payments in the middle of its step")
    os.kill(payments["pid"], signal.SIGKILL)
    ended = await finished
    await client.close()
    assert ended.status == "replied" and [h.agent for h in ended.path] == [
        "triage",
        "payments",
        "account_manager",
    ]
    assert team.child("payments")["pid"] != payments["pid"]
    # The restarted payments replayed its first model call from the journal (not asked
    # again), got the refund from the gateway's ledger (not applied again), and its second
    # model call joined the one the model gateway still had in flight: two calls in all.
    assert _calls(team, conversation, "payments") == 2
    journal = await team.sql(
        "SELECT idx FROM step_journal WHERE conversation=$1 AND agent='payments' ORDER BY idx",
        conversation,
    )
    assert [r["idx"] for r in journal] == [0, 2]  # 0: the refund's call, 1: the refund, 2: the handoff
    refunds = await team.sql("SELECT count(*) AS n FROM shop.refunds WHERE order_id='1001'")
    assert refunds[0]["n"] == 1


async def test_same_tool_same_arguments_loop_is_stopped(team: Stack) -> None:
    client = await team.connect()
    ended = await send_and_wait(client, "runaway tool please", customer="cus_1002", timeout_s=60)
    await client.close()
    assert ended.status == "escalated"
    assert "loop: create_ticket with the same arguments 3 times" in (ended.reason or "")
    tickets = await team.sql("SELECT count(*) AS n FROM shop.tickets WHERE customer_id='cus_1002'")
    assert tickets[0]["n"] == 3  # three went through, nothing after the stop


async def test_dollar_budget_stops_a_runaway_conversation(team: Stack) -> None:
    client = await team.connect()
    conversation = "c-expensive"
    ended = await send_and_wait(
        client, "expensive question", customer="cus_1003", conversation=conversation, timeout_s=60
    )
    await client.close()
    assert ended.status == "escalated"
    assert "dollar budget of $0.05 exceeded" in (ended.reason or "")
    assert _calls(team, conversation, "triage") == 3  # $0.06 spent: no fourth call
    spend = await team.sql(
        "SELECT model_calls, cost_usd FROM conversation_spend WHERE conversation=$1", conversation
    )
    assert spend[0]["model_calls"] == 3 and abs(spend[0]["cost_usd"] - 0.06) < 1e-9


async def test_handoff_ping_pong_is_stopped(team: Stack) -> None:
    client = await team.connect()
    ended = await send_and_wait(client, "bounce me around", timeout_s=60)
    await client.close()
    assert ended.status == "escalated"
    assert "loop: 3 handoffs back and forth between triage and payments" in (ended.reason or "")
    assert [h.agent for h in ended.path] == ["triage", "payments", "triage"]


async def test_replicas_share_one_agent_inbox(team: Stack) -> None:
    replicas = [c for c in team.runtime()["children"] if c["role"] == "account_manager"]  # type: ignore[index]
    assert len(replicas) == 2 and replicas[0]["pid"] != replicas[1]["pid"]
    client = await team.connect()
    ended = await asyncio.gather(*(send_and_wait(client, f"question {n}", timeout_s=60) for n in range(12)))
    await client.close()
    assert all(e.status == "replied" for e in ended)
    replied = await team.sql(
        "SELECT conversation, count(*) AS n FROM conversation_steps WHERE kind='replied'"
        " AND conversation = ANY($1::text[]) GROUP BY 1",
        [e.conversation for e in ended],
    )
    assert len(replied) == 12 and all(r["n"] == 1 for r in replied)  # each step handled once

"""A team on native tool calls, end to end under `corral up` (real nats-server, PostgreSQL,
and the model gateway as its own process): several tool calls in one turn, typed handoff
payloads, a low-confidence answer asked again on the stronger tier, and a rogue agent that
reports its own model answers and usage, which change nothing."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import msgspec
import pytest
import yaml

from corral.bus import (
    ClientUpdate,
    HandoffRefused,
    OutputTaken,
    ToolDecided,
    ToolResult,
    request,
    subjects,
)
from corral.supervisor import send_and_wait
from tests.conftest import SAMPLE_CONFIG
from tests.stack import Stack, running_stack

WEAK = """
agents:
  triage:
    # A correction the agent sends: the model fixes its turn.
    - when: ["Call a tool: to end your turn"]
      answer: {action: handoff, target: payments, confidence: 0.9, reason: "corrected"}
    - when: ["plain words"]
      answer: "It is probably about billing."
    - when: ["broken arguments", "not a JSON object"]
      answer: {action: tool, tool: reply, arguments: "{not json"}
    - when: ["two tools"]
      answer:
        {action: handoff, target: payments, confidence: 0.9, reason: "refund", payload: {order_id: "1001"}}
    - when: ["bad payload"]
      answer:
        action: handoff
        target: payments
        confidence: 0.9
        reason: "refund"
        payload: {order_id: "not a number"}
    - when: ["unsure", "hopeless"]
      answer: {action: handoff, target: payments, confidence: 0.3, reason: "maybe billing"}
  payments:
    - when: ["tool refund -> ok"]
      answer: {action: handoff, target: account_manager, confidence: 0.9, reason: "refund issued"}
    - when: ["order_id"]
      answer:
        - {action: tool, tool: lookup_order, arguments: {order_id: "1001"}}
        - {action: tool, tool: refund, arguments: {order_id: "1001", amount_cents: 4000, reason: "duplicate"}}
    - answer: {action: reply, text: "Which order do you mean?", confidence: 0.9}
  account_manager:
    - answer: {action: reply, text: "Your refund has been issued.", confidence: 0.95}
  tech_support:
    - answer: {action: reply, text: "Restart it.", confidence: 0.9}
"""

STRONG = """
agents:
  triage:
    - when: ["unsure"]
      answer: {action: handoff, target: payments, confidence: 0.92, reason: "billing, sure now"}
    - when: ["hopeless"]
      answer: {action: handoff, target: payments, confidence: 0.35, reason: "still unsure"}
  payments:
    - answer: {action: reply, text: "Which order do you mean?", confidence: 0.9}
  account_manager:
    - answer: {action: reply, text: "Done.", confidence: 0.9}
"""


@pytest.fixture(scope="module")
async def team(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.conftest import _fresh_database

    directory = tmp_path_factory.mktemp("native") / "support"
    shutil.copytree(SAMPLE_CONFIG.parent, directory)
    (directory / "weak.yaml").write_text(WEAK)
    (directory / "strong.yaml").write_text(STRONG)
    config = yaml.safe_load((directory / "corral.yaml").read_text())
    config["models"] = {"fast": {"model": "scripted/weak"}, "smart": {"model": "scripted/strong"}}
    config["scripted"] = {"weak": "weak.yaml", "strong": "strong.yaml"}
    for agent in config["agents"].values():
        agent["tier"] = "fast"
    config["graph"]["tiers"] = ["fast", "smart"]
    (directory / "corral.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(
        tmp_path_factory.mktemp("state"), database, None, directory / "corral.yaml"
    ) as stack:
        yield stack


async def _converse(team: Stack, text: str) -> tuple[object, list[ClientUpdate]]:
    client = await team.connect()
    seen: list[ClientUpdate] = []
    try:
        ended = await send_and_wait(client, text, customer="cus_1001", timeout_s=60, on_update=seen.append)
    finally:
        await client.close()
    return ended, seen


async def _journal(team: Stack, conversation: str) -> list[tuple[object, ...]]:
    rows = await team.sql(
        "SELECT step, idx, agent, tier, confidence, cost_usd, input_tokens > 0 AS tokens,"
        " jsonb_array_length(tool_calls) AS calls FROM step_journal WHERE conversation=$1"
        " ORDER BY step, idx",
        conversation,
    )
    return [tuple(r) for r in rows]


async def test_two_tool_calls_in_one_turn_both_run_in_order_once(team: Stack) -> None:
    ended, seen = await _converse(team, "two tools please")
    assert ended.status == "replied", ended  # type: ignore[attr-defined]
    tools = [(u.agent, u.tool, u.status) for u in seen if isinstance(u, ToolDecided)]
    assert tools == [("payments", "lookup_order", "ok"), ("payments", "refund", "ok")]
    conversation = ended.conversation  # type: ignore[attr-defined]
    audited = await team.sql("SELECT action FROM audit_log WHERE conversation=$1 ORDER BY id", conversation)
    assert [r["action"] for r in audited] == ["lookup_order", "refund"]
    # One model turn at index 0 made both calls: they are the step's calls 1 and 2, each
    # with its own idempotency key.
    ledger = await team.sql(
        "SELECT tool, idempotency_key FROM tool_ledger WHERE conversation=$1 ORDER BY created_at",
        conversation,
    )
    assert [tuple(r) for r in ledger] == [
        ("lookup_order", f"{conversation}:2:1"),
        ("refund", f"{conversation}:2:2"),
    ]
    refunds = await team.sql("SELECT count(*) AS n FROM shop.refunds WHERE order_id='1001'")
    assert refunds[0]["n"] == 1
    # The journal holds the gateway's record of each model turn: payments asked twice
    # (the two calls, then the handoff after the refund's result).
    journal = await _journal(team, conversation)
    assert [(step, idx, agent, calls) for step, idx, agent, *_, calls in journal] == [
        (1, 0, "triage", 1),
        (2, 0, "payments", 2),
        (2, 3, "payments", 1),
        (3, 0, "account_manager", 1),
    ]
    # The payload travelled typed to payments (it is on the path).
    path = await team.sql("SELECT path::text AS path FROM conversations WHERE id=$1", conversation)
    assert '"order_id": "1001"' in path[0]["path"] or '"order_id":"1001"' in path[0]["path"]


async def test_an_invalid_typed_payload_is_refused_with_the_reason(team: Stack) -> None:
    ended, seen = await _converse(team, "bad payload")
    assert ended.status == "refused"  # type: ignore[attr-defined]
    refused = [u for u in seen if isinstance(u, HandoffRefused)]
    assert len(refused) == 1
    assert refused[0].reason.startswith("handoff triage -> payments refused: invalid payload for payments:")
    assert "order_id" in refused[0].reason and "pattern" in refused[0].reason


async def test_a_low_confidence_answer_is_asked_again_on_the_stronger_tier_once(team: Stack) -> None:
    ended, _ = await _converse(team, "I am unsure what this charge is")
    assert ended.status == "replied"  # type: ignore[attr-defined]
    conversation = ended.conversation  # type: ignore[attr-defined]
    journal = await _journal(team, conversation)
    # triage's step: the fast tier's 0.3, then the smart tier's 0.92, accepted; no third ask.
    triage = [(idx, tier, confidence) for step, idx, agent, tier, confidence, *_ in journal if step == 1]
    assert triage == [(0, "fast", pytest.approx(0.3)), (1, "smart", pytest.approx(0.92))]
    assert all(tokens for *_, tokens, _calls in journal)
    hops = await team.sql("SELECT path::text AS path FROM conversations WHERE id=$1", conversation)
    assert "billing, sure now" in hops[0]["path"]


async def test_still_below_on_the_strongest_tier_escalates_to_a_human_with_the_reason(team: Stack) -> None:
    ended, _ = await _converse(team, "hopeless case")
    assert ended.status == "escalated"  # type: ignore[attr-defined]
    assert ended.reason == (  # type: ignore[attr-defined]
        "handoff triage -> payments confidence 0.35 is below 0.60; escalated to a human"
    )
    journal = await _journal(team, ended.conversation)  # type: ignore[attr-defined]
    assert [(tier, confidence) for _, _, _, tier, confidence, *_ in journal] == [
        ("fast", pytest.approx(0.3)),
        ("smart", pytest.approx(0.35)),
    ]


async def test_a_rogue_agent_reporting_its_own_answers_and_usage_changes_nothing(team: Stack) -> None:
    """payments' credentials, used by hand: a tool call and a step output that carry a
    forged model answer with negative spend (the old wire shape). Neither is journaled nor
    counted: the journal is written by the model gateway alone."""
    ended, _ = await _converse(team, "I am unsure what this charge is")
    conversation = ended.conversation  # type: ignore[attr-defined]
    before = await _journal(team, conversation)
    spend_before = await team.sql("SELECT coalesce(sum(cost_usd), 0) AS usd FROM agent_spend")
    rogue = await team.connect(subjects.agent_identity("payments"))
    forged = {
        "conversation": conversation,
        "step": 2,
        "index": 7,
        "agent": "payments",
        "text": "I refunded everything",
        "model": "gpt-9",
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": -1000.0,
    }
    encode = msgspec.json.encode
    try:
        tool = {
            "type": "tool.call",
            "v": 1,
            "conversation": conversation,
            "step": 2,
            "index": 7,
            "agent": "payments",
            "tool": "lookup_order",
            "arguments": {"order_id": "1001"},
            "response": forged,
        }
        result = await request(
            rogue.nc, subjects.agent_tool("payments"), encode(tool), ToolResult, timeout_s=10
        )
        assert result.status == "stopped" or result.status == "denied"  # the step is over
        reply = {
            "type": "agent.reply",
            "v": 1,
            "conversation": conversation,
            "step": 2,
            "agent": "payments",
            "text": "forged",
            "confidence": 1.0,
            "response": forged,
        }
        taken = await request(
            rogue.nc, subjects.agent_reply("payments"), encode(reply), OutputTaken, timeout_s=10
        )
        assert taken.status in ("taken", "refused")
    finally:
        await rogue.close()
    assert await _journal(team, conversation) == before
    spend_after = await team.sql("SELECT coalesce(sum(cost_usd), 0) AS usd FROM agent_spend")
    assert spend_after == spend_before
    forged_rows = await team.sql("SELECT count(*) AS n FROM step_journal WHERE model='gpt-9' OR cost_usd < 0")
    assert forged_rows[0]["n"] == 0


async def test_a_plain_message_is_told_back_and_the_corrected_turn_goes_on(team: Stack) -> None:
    ended, _ = await _converse(team, "plain words please")
    assert ended.status == "replied"  # type: ignore[attr-defined]
    hops = await team.sql("SELECT path::text AS path FROM conversations WHERE id=$1", ended.conversation)  # type: ignore[attr-defined]
    assert "corrected" in hops[0]["path"]
    journal = await _journal(team, ended.conversation)  # type: ignore[attr-defined]
    assert [(step, idx, calls) for step, idx, *_, calls in journal if step == 1] == [(1, 0, 0), (1, 1, 1)]


async def test_a_model_that_never_writes_a_valid_turn_escalates_and_the_agent_serves_on(team: Stack) -> None:
    ended, _ = await _converse(team, "broken arguments")
    assert ended.status == "escalated"  # type: ignore[attr-defined]
    reason = ended.reason or ""  # type: ignore[attr-defined]
    assert "cannot be acted on after 2 corrections" in reason and "not a JSON object" in reason
    journal = await _journal(team, ended.conversation)  # type: ignore[attr-defined]
    assert len(journal) == 3  # the first turn and two corrections, each journaled and paid
    # triage keeps serving: the next conversation goes through.
    again, _ = await _converse(team, "I am unsure what this charge is")
    assert again.status == "replied"  # type: ignore[attr-defined]

"""Multi-turn conversations end to end under `corral up` (real nats-server, PostgreSQL and
processes): payments asks which order, the customer answers with `corral send
--conversation`, and the refund is applied once, though payments was SIGKILLed between the
two turns; a conversation whose customer goes quiet is closed with the reason."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
import yaml

from corral.bus import ConversationAwaiting, MessageRefused
from corral.supervisor.core._client import message_until_settled, send_until_settled
from tests.conftest import eventually
from tests.stack import Stack, running_stack, sample_team

IDLE_TIMEOUT_S = 20
"""Long enough for the multi-turn test's pause; the idle test backdates its conversation."""

BROKEN = "My blender arrived broken, I want my money back"


@pytest.fixture(scope="module")
async def team(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from tests.conftest import _fresh_database

    config = sample_team(
        tmp_path_factory.mktemp("turns") / "support", {"conversation": {"idle_timeout_s": IDLE_TIMEOUT_S}}
    )
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(tmp_path_factory.mktemp("state"), database, None, config) as stack:
        yield stack


async def _ask(team: Stack) -> ConversationAwaiting:
    """Start the damaged-item conversation; payments asks which order."""
    client = await team.connect()
    try:
        settled = await send_until_settled(client, BROKEN, customer="cus_1005", timeout_s=60)
    finally:
        await client.close()
    assert isinstance(settled, ConversationAwaiting), settled
    return settled


async def _refunds(team: Stack) -> int:
    rows = await team.sql("SELECT count(*) AS n FROM shop.refunds WHERE order_id='2001'")
    return int(rows[0]["n"])


async def test_multi_turn_refund_applied_once_though_payments_is_killed_between_turns(team: Stack) -> None:
    asked = await _ask(team)
    assert (asked.agent, asked.turn) == ("payments", 2)
    assert asked.text == "Sorry to hear that! Which order was it? Please send its number."
    conversation = asked.conversation
    before = await _refunds(team)

    # Between the turns, payments dies; the customer answers while it is down.
    killed = team.child("payments")["pid"]
    os.kill(killed, signal.SIGKILL)
    answered = await asyncio.to_thread(
        team.corral, "send", "--conversation", conversation, "--wait", "--timeout", "90", "It was order 2001"
    )
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "status: replied" in answered.stdout
    assert team.child("payments")["pid"] != killed  # the launcher restarted it

    assert await _refunds(team) == before + 1
    ledger = await team.sql(
        "SELECT tool, idempotency_key FROM tool_ledger WHERE conversation=$1 ORDER BY created_at",
        conversation,
    )
    assert [tuple(r) for r in ledger] == [("refund", f"{conversation}:3:1")]
    rows = await team.sql(
        "SELECT status, turns::text AS turns, current_agent FROM conversations WHERE id=$1", conversation
    )
    assert (rows[0]["status"], rows[0]["current_agent"]) == ("replied", "account_manager")
    turns = yaml.safe_load(rows[0]["turns"])
    assert [(t["role"], t.get("agent", "")) for t in turns] == [
        ("customer", ""),
        ("agent", "payments"),
        ("customer", ""),
        ("tool", "payments"),  # its refund, which account_manager was shown
        ("agent", "account_manager"),
    ]
    assert turns[2]["text"] == "It was order 2001"
    assert turns[3]["tool"] == "refund" and turns[3]["text"].startswith("tool refund -> ok")
    steps = await team.sql(
        "SELECT step, agent, kind FROM conversation_steps WHERE conversation=$1 ORDER BY id", conversation
    )
    assert [tuple(r) for r in steps] == [
        (1, "triage", "started"),
        (2, "triage", "forwarded"),
        (2, "payments", "asked"),
        (3, "payments", "answered"),
        (4, "payments", "forwarded"),
        (4, "account_manager", "replied"),
    ]

    shown = await asyncio.to_thread(team.corral, "show", conversation)
    assert "  turns:\n    customer: " + BROKEN in shown.stdout, shown.stdout
    assert (
        "    payments: Sorry to hear that!" in shown.stdout
        and "    customer: It was order 2001" in shown.stdout
    )

    # The conversation is resolved: another message is refused, and nothing changes.
    late = await asyncio.to_thread(
        team.corral, "send", "--conversation", conversation, "--wait", "--timeout", "30", "thanks!"
    )
    assert late.returncode == 1, late.stdout + late.stderr
    assert f"conversation {conversation} is replied, not awaiting the customer's message" in late.stdout
    assert await _refunds(team) == before + 1


async def test_a_conversation_whose_customer_goes_quiet_is_closed_with_the_reason(team: Stack) -> None:
    asked = await _ask(team)
    # As if the customer had been quiet for an hour (no test waits that long).
    await team.sql(
        "UPDATE conversations SET updated_at = now() - interval '1 hour' WHERE id=$1", asked.conversation
    )

    async def closed() -> str | None:
        rows = await team.sql("SELECT status, reason FROM conversations WHERE id=$1", asked.conversation)
        return rows[0]["reason"] if rows[0]["status"] == "closed" else None

    reason = await eventually(closed, timeout=30, message="the idle conversation closed")
    assert reason == f"closed: no message from the customer for {IDLE_TIMEOUT_S} s"
    late = await asyncio.to_thread(
        team.corral, "send", "--conversation", asked.conversation, "--wait", "It was order 2001"
    )
    assert late.returncode == 1 and "is closed, not awaiting" in late.stdout, late.stdout + late.stderr


async def test_a_message_for_no_such_conversation_is_refused_with_the_reason(team: Stack) -> None:
    client = await team.connect()
    try:
        settled = await message_until_settled(client, "c-nosuchconversation", "hello?", timeout_s=60)
    finally:
        await client.close()
    assert isinstance(settled, MessageRefused), settled
    assert "unknown conversation 'c-nosuchconversation'" in settled.reason
    rows = await team.sql("SELECT count(*) AS n FROM conversations WHERE id='c-nosuchconversation'")
    assert rows[0]["n"] == 0

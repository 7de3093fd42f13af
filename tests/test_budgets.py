"""Every budget against the one spend ledger in PostgreSQL (real database)."""

from __future__ import annotations

import asyncpg
import pytest

from corral.bus import JournalEntry, JournalQuery
from corral.supervisor.store._budgets import Budgets, exceeded
from corral.supervisor.store._journal import JournalService, journal_response
from corral.supervisor.store._store import Store

_calls = iter(range(1_000_000))


async def record_spend(
    conn: asyncpg.Connection, conversation: str, agent: str, tokens: int, usd: float
) -> None:
    """One journaled model call of ``agent`` at step 1: the ledger's only writer."""
    entry = JournalEntry(
        conversation=conversation,
        step=1,
        index=next(_calls),
        agent=agent,
        text="{}",
        input_tokens=tokens,
        cost_usd=usd,
    )
    owner = await journal_response(conn, conversation, entry, agent)
    assert owner is not None and owner["current_agent"] == agent


@pytest.fixture
async def conn(database_url: str) -> asyncpg.Connection:
    store = await Store.open(database_url)
    await store.close()
    connection = await asyncpg.connect(database_url)
    await connection.execute(
        "INSERT INTO conversations (id, text, status, current_agent, step, created_at)"
        " VALUES ('c1', 't', 'running', 'payments', 1, now() - interval '90 seconds')"
    )
    yield connection
    await connection.close()


async def test_within_every_budget(conn: asyncpg.Connection) -> None:
    budgets = Budgets(max_tokens=1000, max_usd=1.0, max_seconds=600, daily_usd={"payments": 5.0})
    await record_spend(conn, "c1", "payments", 100, 0.10)
    assert await exceeded(conn, budgets, "c1", "payments") is None


@pytest.mark.parametrize(
    ("budgets", "tokens", "usd", "reason"),
    [
        (Budgets(max_tokens=500), 600, 0.0, "token budget of 500 exceeded (600 used)"),
        (Budgets(max_usd=0.5), 10, 0.75, "dollar budget of $0.50 exceeded"),
        (Budgets(max_seconds=60), 0, 0.0, "wall-clock budget of 60s exceeded"),
        (Budgets(daily_usd={"payments": 0.2}), 10, 0.25, "payments's daily budget of $0.20 exceeded"),
    ],
)
async def test_each_budget_stops(
    conn: asyncpg.Connection, budgets: Budgets, tokens: int, usd: float, reason: str
) -> None:
    await record_spend(conn, "c1", "payments", tokens, usd)
    stop = await exceeded(conn, budgets, "c1", "payments")
    assert stop is not None and reason in stop


async def test_the_daily_budget_spans_conversations(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO conversations (id, text, status, current_agent, step)"
        " VALUES ('c2', 't', 'running', 'payments', 1)"
    )
    budgets = Budgets(daily_usd={"payments": 0.3})
    await record_spend(conn, "c1", "payments", 10, 0.2)
    assert await exceeded(conn, budgets, "c2", "payments") is None
    await record_spend(conn, "c1", "payments", 10, 0.2)
    assert "daily budget" in (await exceeded(conn, budgets, "c2", "payments") or "")


async def test_a_key_journaled_again_counts_once_for_the_conversation_and_each_time_for_the_agent(
    conn: asyncpg.Connection,
) -> None:
    """The journal keeps the first answer of a key; every call the model gateway made was
    paid, so the agent's spend counts each (an agent that asks again without saying so
    pays for it)."""
    entry = JournalEntry(conversation="c1", step=1, index=0, agent="payments", text="{}", cost_usd=0.25)
    for _ in range(3):
        await journal_response(conn, "c1", entry, "payments")
    spend = await conn.fetchrow(
        "SELECT model_calls, cost_usd FROM conversation_spend WHERE conversation='c1'"
    )
    assert (spend["model_calls"], spend["cost_usd"]) == (1, 0.25)
    assert await conn.fetchval("SELECT cost_usd FROM agent_spend WHERE agent='payments'") == 0.75


async def test_a_response_out_of_turn_is_not_journaled(conn: asyncpg.Connection) -> None:
    entry = JournalEntry(conversation="c1", step=1, index=0, agent="triage", text="{}", cost_usd=0.25)
    owner = await journal_response(conn, "c1", entry, "triage")
    assert owner is not None and owner["current_agent"] == "payments"
    assert await conn.fetchval("SELECT count(*) FROM step_journal") == 0
    assert await conn.fetchval("SELECT count(*) FROM conversation_spend") == 0
    # Paid all the same: the agent's spend has it.
    assert await conn.fetchval("SELECT cost_usd FROM agent_spend WHERE agent='triage'") == 0.25


async def test_a_redelivered_step_learns_whether_it_is_over_or_stopped(
    conn: asyncpg.Connection, database_url: str
) -> None:
    store = await Store.open(database_url)
    try:
        republished: list[str] = []

        async def _republish(conversation: str) -> None:
            republished.append(conversation)

        journal = JournalService(
            None,  # type: ignore[arg-type]
            store.pool,
            Budgets(max_usd=0.5),
            on_over=_republish,
        )
        await record_spend(conn, "c1", "payments", 10, 0.1)
        answer = await journal.handle(JournalQuery(conversation="c1", step=1, agent="payments"), "payments")
        assert answer.verdict == "continue" and len(answer.entries) == 1
        # Over budget: the step must stop (and its conversation be escalated), not vanish.
        await record_spend(conn, "c1", "payments", 10, 0.5)
        answer = await journal.handle(JournalQuery(conversation="c1", step=1, agent="payments"), "payments")
        assert answer.verdict == "stop" and "dollar budget" in answer.reason
        # Someone else's turn now: the step is over; nothing is left to do.
        assert republished == []
        answer = await journal.handle(JournalQuery(conversation="c1", step=1, agent="triage"), "triage")
        assert answer.verdict == "over"
        # Its output was decided, but what the decision published may have been lost with
        # the answer: the conversation's messages go out again (deduplicated by id).
        assert republished == ["c1"]
        answer = await journal.handle(JournalQuery(conversation="nope", step=1, agent="triage"), "triage")
        assert answer.verdict == "over" and republished == ["c1"]
    finally:
        await store.close()

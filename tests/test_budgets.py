"""Every budget against the one spend ledger in PostgreSQL (real database)."""

from __future__ import annotations

import asyncpg
import pytest

from supervisor._budgets import Budgets, exceeded, record_spend
from supervisor._store import Store


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

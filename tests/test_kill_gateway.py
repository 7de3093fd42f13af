"""The gateway's own view of the kill switch (issue 13, section 3): no side effect commits after
``kill_agent`` returns, whatever the agent does to its watchers, because the gateway reads the
agent's kill row FOR SHARE in the statement that takes every call's locks.

Deterministic, no timing: a call in flight holds its lock, and a kill from another connection
is seen waiting for it in ``pg_locks``; once the kill commits, every call is refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from corral.bus import ConversationWaiting, JournalQuery
from corral.supervisor.core._client import send_until_settled
from corral.supervisor.store._agent_controls import agent_killed, kill_agent, revive_agent
from corral.supervisor.store._budgets import Budgets
from corral.supervisor.store._journal import JournalService
from tests.conftest import eventually
from tests.stack import running_stack
from tests.test_gateway import (
    GatedRefund,
    Shop,
    assert_audit_intact,
    audit_rows,
    ledger,
    open_conversation,
    policy,
    refund,
    refunds,
    shop,
    shop_snapshot,
)

__all__ = ["policy", "shop"]  # fixtures


async def _waiting_for_a_lock(pool: asyncpg.Pool, pid: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM pg_locks WHERE pid=$1 AND NOT granted", pid))


async def test_a_kill_waits_for_the_call_in_flight_and_no_call_runs_after_it(
    shop: Shop, database_url: str
) -> None:
    await open_conversation(shop.pool, "c-flight", "cus_1001", "payments")
    await open_conversation(shop.pool, "c-after", "cus_1002", "payments")
    gate = GatedRefund("c-flight:1:0")
    gateway = shop.new_gateway([gate])
    in_flight = asyncio.create_task(gateway.call(refund("c-flight", "1001", 4_000), "payments"))
    await asyncio.wait_for(gate.inserted.wait(), 30)  # its effect is written, not committed

    operator = await asyncpg.connect(database_url)
    try:
        pid = await operator.fetchval("SELECT pg_backend_pid()")
        kill = asyncio.create_task(kill_agent(operator, "payments", "compromised", "ops"))
        await eventually(lambda: _waiting_for_a_lock(shop.pool, pid), message="the kill waiting for the call")
        assert not kill.done()

        gate.release.set()
        finished = await in_flight
        await asyncio.wait_for(kill, 30)  # returns only after the call in flight committed
    finally:
        gate.release.set()
        await operator.close()

    assert finished.status == "ok"
    assert await refunds(shop.pool) == [("1001", 4_000)]
    before = await shop_snapshot(shop.pool)

    after = await shop.gateway.call(refund("c-after", "1005", 4_000), "payments")

    assert (after.status, after.reason) == ("stopped", "agent payments is killed (compromised)")
    assert await shop_snapshot(shop.pool) == before
    [row] = await audit_rows(shop.pool, "c-after")
    assert (row["decision"], row["outcome"], row["detail"]) == ("stop", "stopped", after.reason)
    assert await ledger(shop.pool, "c-after") == []  # a kill is no decision on the call
    await assert_audit_intact(shop.pool)


async def test_a_call_that_waited_for_a_kill_sees_it(shop: Shop, database_url: str) -> None:
    """The other order: a kill holds the agent's row (its transaction not yet committed); a call
    arriving meanwhile waits on the row, then re-reads it and is refused."""
    await open_conversation(shop.pool, "c-late", "cus_1001", "payments")
    operator = await asyncpg.connect(database_url)
    try:
        async with operator.transaction():
            await kill_agent(operator, "payments", "compromised", "ops")
            call = asyncio.create_task(shop.gateway.call(refund("c-late", "1001", 4_000), "payments"))
            await eventually(
                lambda: shop.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype='transactionid' AND NOT granted"
                ),
                message="the call waiting for the kill",
            )
            assert not call.done()
        result = await asyncio.wait_for(call, 30)
    finally:
        await operator.close()

    assert (result.status, result.reason) == ("stopped", "agent payments is killed (compromised)")
    assert await refunds(shop.pool) == []


async def test_the_journal_answers_stop_to_a_killed_agent_and_revive_restores_it(shop: Shop) -> None:
    await open_conversation(shop.pool, "c-journal-kill", "cus_1001", "payments")
    journal = JournalService(None, shop.pool, Budgets())  # type: ignore[arg-type]
    query = JournalQuery(conversation="c-journal-kill", step=1, agent="payments")
    assert (await journal.handle(query, "payments")).verdict == "continue"

    await kill_agent(shop.pool, "payments", "compromised", "ops")
    assert await agent_killed(shop.pool, "payments") == "compromised"
    stopped = await journal.handle(query, "payments")
    assert (stopped.verdict, stopped.reason) == ("stop", "agent payments is killed (compromised)")

    assert await revive_agent(shop.pool, "payments")
    assert not await revive_agent(shop.pool, "payments")
    assert (await journal.handle(query, "payments")).verdict == "continue"
    assert (await shop.gateway.call(refund("c-journal-kill", "1001", 4_000), "payments")).status == "ok"


# --- on a running stack: `corral kill agent` and `corral approve` -----------------------------------


async def test_on_a_stack_corral_kill_marks_the_agent_for_the_gateway_and_a_dead_approval_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    async with running_stack(tmp_path / "state", database_url, None) as stack:
        client = await stack.connect()
        try:
            waiting = await send_until_settled(
                client, "Please refund order 1002", customer="cus_1001", timeout_s=60
            )
        finally:
            await client.close()
        assert isinstance(waiting, ConversationWaiting)
        # Every configured agent has its row from the gateway's start (a kill waits on it).
        rows = await stack.sql("SELECT agent FROM agent_controls ORDER BY agent")
        assert [r["agent"] for r in rows] == sorted(["triage", "payments", "tech_support", "account_manager"])

        killed = await asyncio.to_thread(stack.corral, "kill", "conversation", waiting.conversation)
        assert killed.returncode == 0, killed.stderr
        approved = await asyncio.to_thread(stack.corral, "approve", waiting.approval_id)
        assert approved.returncode == 1
        said = " ".join(approved.stderr.split())  # the console wraps long lines
        assert f"cannot be granted: conversation {waiting.conversation} is killed" in said

        killed = await asyncio.to_thread(stack.corral, "kill", "agent", "payments", "--reason", "fraud")
        assert killed.returncode == 0, killed.stderr
        rows = await stack.sql(
            "SELECT reason FROM agent_controls WHERE agent='payments' AND killed_at IS NOT NULL"
        )
        assert [r["reason"] for r in rows] == ["fraud"]
        revived = await asyncio.to_thread(stack.corral, "revive", "agent", "payments")
        assert revived.returncode == 0, revived.stderr
        assert await stack.sql("SELECT 1 FROM agent_controls WHERE killed_at IS NOT NULL") == []
        assert await stack.sql("SELECT 1 FROM shop.refunds WHERE order_id='1002'") == []

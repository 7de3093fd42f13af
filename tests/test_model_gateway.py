"""The model gateway on a real nats-server and a real PostgreSQL: it journals what the model
said and cost before the agent sees it, answers a call asked again from the journal (paid
once), refuses calls past a budget, off the caller's turn, on another agent's behalf or on
a tier the agent may not use, whatever the agent sends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from corral.bus import (
    Bus,
    BusConfig,
    ChatTurn,
    ModelAnswer,
    ModelCall,
    connect,
    request,
    subjects,
)
from corral.router import ModelGateway, ScriptedModel, ScriptRule, ScriptRules
from corral.supervisor import EmbeddedNats
from corral.supervisor.store._budgets import Budgets
from corral.supervisor.store._model_ledger import ModelLedger
from corral.supervisor.store._store import Store

RULES = ScriptRules(
    agents={
        "payments": [
            ScriptRule(
                answer=[
                    {"action": "tool", "tool": "lookup_order", "arguments": {"order_id": "1001"}},
                    {"action": "handoff", "target": "account_manager", "confidence": 0.8, "reason": "r"},
                ],
                cost_usd=0.03,
            )
        ]
    }
)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await Store.open(database_url)
    async with store.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO conversations (id, text, status, current_agent, step)"
            " VALUES ('c1', 'refund', 'running', 'payments', 1)"
        )
    yield store
    await store.close()


@pytest.fixture
async def payments(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(
        BusConfig(
            servers=[nats_server.url], identity=subjects.agent_identity("payments"), reconnect_forever=False
        )
    )
    yield bus
    await bus.close()


@pytest.fixture
async def model(nats_server: EmbeddedNats, store: Store) -> AsyncIterator[ScriptedModel]:
    scripted = ScriptedModel(RULES, name="scripted/support")
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    ledger = ModelLedger(store.pool, Budgets(max_usd=0.05))
    tiers = {"payments": frozenset({"fast"}), "triage": frozenset({"fast"})}
    async with ModelGateway(bus.nc, {"fast": scripted, "smart": scripted}, ledger, tiers, {}):
        yield scripted
    await bus.close()


def _call(index: int, **overrides: object) -> ModelCall:
    fields: dict[str, object] = {
        "conversation": "c1",
        "step": 1,
        "index": index,
        "agent": "payments",
        "tier": "fast",
        "messages": [
            ChatTurn(role="system", content="You are payments."),
            ChatTurn(role="user", content="hi"),
        ],
    }
    fields.update(overrides)
    return ModelCall(**fields)  # type: ignore[arg-type]


async def _ask(bus: Bus, call: ModelCall, sender: str = "payments") -> ModelAnswer:
    return await request(bus.nc, subjects.agent_model(sender), call, ModelAnswer, timeout_s=10)


async def _journal(store: Store) -> list[asyncpg.Record]:
    async with store.pool.acquire() as conn:
        return list(
            await conn.fetch(
                "SELECT idx, agent, tier, model, cost_usd, input_tokens, output_tokens, confidence,"
                " tool_calls::text AS tool_calls FROM step_journal ORDER BY idx"
            )
        )


async def test_the_answer_is_journaled_with_its_true_cost_and_asked_once(
    payments: Bus, model: ScriptedModel, store: Store
) -> None:
    first = await _ask(payments, _call(0))
    assert first.status == "ok" and not first.replayed
    assert [c.name for c in first.tool_calls] == ["lookup_order", "transfer_to_account_manager"]
    [row] = await _journal(store)
    assert (row["idx"], row["agent"], row["tier"], row["model"]) == (
        0,
        "payments",
        "fast",
        "scripted/support",
    )
    assert row["cost_usd"] == pytest.approx(0.03) and row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["confidence"] == pytest.approx(0.8)
    assert "lookup_order" in row["tool_calls"]
    # Asked again (a redelivered step): the journal answers; the model is not called, nor paid.
    again = await _ask(payments, _call(0))
    assert again.replayed and again.tool_calls == first.tool_calls and again.cost_usd == first.cost_usd
    assert model.calls == 1
    assert len(await _journal(store)) == 1


async def test_a_conversation_over_its_budget_gets_no_further_model_call(
    payments: Bus, model: ScriptedModel, store: Store
) -> None:
    assert (await _ask(payments, _call(0))).status == "ok"  # $0.03
    assert (await _ask(payments, _call(1))).status == "ok"  # $0.06: over $0.05 after it
    for index in (2, 3, 4):  # whatever the agent keeps sending
        stopped = await _ask(payments, _call(index))
        assert stopped.status == "stopped"
        assert "dollar budget of $0.05 exceeded" in stopped.reason
    assert model.calls == 2
    assert [r["idx"] for r in await _journal(store)] == [0, 1]


async def test_calls_off_the_agents_turn_or_authority_are_refused(
    payments: Bus, model: ScriptedModel, store: Store
) -> None:
    cases = [
        (_call(0, agent="triage"), "the call claims to come from 'triage'"),
        (_call(0, step=2), "step 2 is not payments's turn"),
        (_call(0, conversation="c-none"), "there is no conversation 'c-none'"),
        (_call(0, tier="smart"), "tier 'smart' is not payments's (allowed: fast)"),
    ]
    for call, reason in cases:
        answer = await _ask(payments, call)
        assert (answer.status, answer.reason) == ("stopped", reason)
    async with store.pool.acquire() as conn:
        await conn.execute("UPDATE conversations SET status='escalated' WHERE id='c1'")
    answer = await _ask(payments, _call(0))
    assert (answer.status, answer.reason) == ("stopped", "the conversation is escalated")
    assert model.calls == 0
    assert await _journal(store) == []


@pytest.fixture
async def unbudgeted(nats_server: EmbeddedNats, store: Store) -> AsyncIterator[ScriptedModel]:
    """The gateway with no budget for payments: a step's first calls go unread."""
    scripted = ScriptedModel(RULES, name="scripted/support")
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    ledger = ModelLedger(store.pool, Budgets())
    async with ModelGateway(bus.nc, {"fast": scripted}, ledger, {"payments": frozenset({"fast"})}, {}):
        yield scripted
    await bus.close()


async def _agent_spend(store: Store) -> float:
    async with store.pool.acquire() as conn:
        return float(await conn.fetchval("SELECT coalesce(sum(cost_usd), 0) FROM agent_spend"))


async def test_without_a_budget_every_call_is_metered_whatever_the_agent_claims(
    payments: Bus, unbudgeted: ScriptedModel, store: Store
) -> None:
    """No budget applies, so a step's first call is made before anything is read: the
    record checks the turn and the journal, and every call made is paid for in the agent's
    spend. An honest redelivery says so (``again``) and is answered from the journal."""
    first = await _ask(payments, _call(0))
    assert first.status == "ok" and unbudgeted.calls == 1
    # Off its turn: made (nothing read first), never journaled, but metered.
    off_turn = await _ask(payments, _call(0, step=2))
    assert (off_turn.status, off_turn.reason) == ("stopped", "step 2 is no longer payments's turn")
    # The same call again without saying so: made, metered, answered with the first answer.
    repeated = await _ask(payments, _call(0))
    assert repeated.replayed and repeated.tool_calls == first.tool_calls
    assert unbudgeted.calls == 3
    assert await _agent_spend(store) == pytest.approx(3 * 0.03)
    assert [r["idx"] for r in await _journal(store)] == [0]
    # A redelivered step says `again`: the journal answers, the model is not called.
    honest = await _ask(payments, _call(0, again=True))
    assert honest.replayed and unbudgeted.calls == 3

"""The human queue end to end under `corral up`: an escalated conversation is in the queue;
two operators claim it at once and exactly one wins; the winner's reply reaches the
customer's update stream; the customer's answer comes back to the queue; a handback to
account_manager completes the conversation; every action is in the audit chain with the
operator's name; a lapsed claim returns the conversation to the queue."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from corral.bus import (
    Bus,
    ConversationAwaiting,
    ConversationEnded,
    OperatorAction,
    OperatorAnswer,
    OperatorRequest,
    request,
    subjects,
)
from corral.supervisor.core._client import message_until_settled, send_until_settled, watching
from tests.stack import Stack, running_stack

ESCALATING = "My lawyer says I should sue you"
EDGES = "graph.edges.human: account_manager, payments"


@pytest.fixture(scope="module")
async def team(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:
        yield stack


@pytest.fixture
async def operator(team: Stack) -> AsyncIterator[Bus]:
    bus = await team.connect("admin")
    yield bus
    await bus.close()


async def _ask(
    operator: Bus, action: OperatorAction, conversation: str, by: str, **fields: str
) -> OperatorAnswer:
    message = OperatorRequest(action=action, conversation=conversation, by=by, id=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]
    return await request(operator.nc, subjects.operator_requests(), message, OperatorAnswer, timeout_s=30)


async def _escalated(team: Stack) -> str:
    client = await team.connect()
    try:
        settled = await send_until_settled(client, ESCALATING, customer="cus_1001", timeout_s=60)
    finally:
        await client.close()
    assert isinstance(settled, ConversationEnded) and settled.status == "escalated", settled
    return settled.conversation


def _queue(team: Stack) -> list[dict[str, object]]:
    listed = team.corral("queue", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["queue"]  # type: ignore[no-any-return]


async def test_claim_reply_and_handback_reach_the_customer_and_are_audited(
    team: Stack, operator: Bus
) -> None:
    conversation = await _escalated(team)
    queued = {q["conversation"]: q for q in await asyncio.to_thread(_queue, team)}
    assert queued[conversation]["claimed_by"] is None
    assert "confidence 0.31 is below 0.60; escalated to a human" in str(queued[conversation]["reason"])

    # Two operators at once: exactly one wins.
    ada, bob = await asyncio.gather(
        _ask(operator, "claim", conversation, "ada"), _ask(operator, "claim", conversation, "bob")
    )
    assert sorted([ada.status, bob.status]) == ["ok", "refused"], (ada, bob)
    winner, loser = ("ada", "bob") if ada.status == "ok" else ("bob", "ada")
    lost = bob if winner == "ada" else ada
    assert lost.reason == f"conversation {conversation} is claimed by {winner}"
    assert lost.claimed_by == winner
    queued = {q["conversation"]: q for q in await asyncio.to_thread(_queue, team)}
    assert queued[conversation]["claimed_by"] == winner

    # The loser cannot act on it; the winner's reply reaches the customer.
    refused = await _ask(operator, "reply", conversation, loser, text="Hi, it's me")
    assert refused.status == "refused" and f"is claimed by {winner}" in refused.reason
    client = await team.connect()
    try:
        async with watching(client, conversation, settled=(ConversationAwaiting,)) as asked:
            replied = await asyncio.to_thread(
                team.corral, "reply", conversation, "Sorry for the trouble. What happened?", "--by", winner
            )
            assert replied.returncode == 0, replied.stdout + replied.stderr
            update = await asyncio.wait_for(asked, 30)
        assert update == ConversationAwaiting(
            conversation=conversation, agent="human", text="Sorry for the trouble. What happened?", turn=2
        )

        # The customer's answer comes back to the queue, to the operator holding it.
        back = await message_until_settled(client, conversation, "I was charged twice", timeout_s=60)
        assert isinstance(back, ConversationEnded) and back.status == "escalated", back
        assert back.reason == "the customer answered; awaiting an operator"

        # Back to an agent: only along graph.edges.human.
        wrong = await _ask(operator, "handback", conversation, winner, agent="tech_support")
        assert wrong.status == "refused"
        assert wrong.reason == f"'tech_support' is not an edge from human in the graph ({EDGES})"
        async with watching(client, conversation) as ended:
            handed = await asyncio.to_thread(
                team.corral,
                "handback",
                conversation,
                "account_manager",
                "--by",
                winner,
                "--note",
                "customer wants a refund for the duplicate charge",
            )
            assert handed.returncode == 0, handed.stdout + handed.stderr
            outcome = await asyncio.wait_for(ended, 60)
    finally:
        await client.close()
    assert isinstance(outcome, ConversationEnded) and outcome.status == "replied", outcome
    assert outcome.reply is not None and "refund" in outcome.reply

    await _check_the_record(team, conversation, winner, loser)


async def _check_the_record(team: Stack, conversation: str, winner: str, loser: str) -> None:
    """Every action in the audit chain with its operator, the transcript with the human
    turn, and the conversation out of the queue."""
    audited = await team.sql(
        "SELECT agent, credential_id, action, outcome, on_behalf_of FROM audit_log"
        " WHERE conversation=$1 AND action LIKE 'queue.%' ORDER BY id",
        conversation,
    )
    claimed = f"conversation {conversation} is claimed by {winner}"
    assert [tuple(r) for r in audited] == [
        (winner, "admin", "queue.claim", "applied", "cus_1001"),
        (loser, "admin", "queue.claim", f"refused: {claimed}", "cus_1001"),
        (
            loser,
            "admin",
            "queue.reply",
            f"refused: {claimed}: `corral claim {conversation} --by {loser}` first",
            "cus_1001",
        ),
        (winner, "admin", "queue.reply", "applied", "cus_1001"),
        (
            winner,
            "admin",
            "queue.handback",
            "refused: 'tech_support' is not an edge from human in the graph"
            " (graph.edges.human: account_manager, payments)",
            "cus_1001",
        ),
        (winner, "admin", "queue.handback", "applied", "cus_1001"),
    ]
    turns = await team.sql("SELECT turns::text AS t FROM conversations WHERE id=$1", conversation)
    assert [(t["role"], t["agent"]) for t in json.loads(turns[0]["t"])] == [
        ("customer", ""),
        ("human", winner),
        ("customer", ""),
        ("agent", "account_manager"),
    ]
    assert conversation not in {q["conversation"] for q in await asyncio.to_thread(_queue, team)}
    verified = await asyncio.to_thread(team.corral, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_lapsed_claim_returns_the_conversation_to_the_queue(team: Stack, operator: Bus) -> None:
    conversation = await _escalated(team)
    assert (await _ask(operator, "claim", conversation, "ada")).status == "ok"
    assert (await _ask(operator, "claim", conversation, "bob")).status == "refused"
    # As if queue.claim_ttl_s had passed without an action (no test waits that long).
    await team.sql(
        "UPDATE conversation_claims SET expires_at = now() - interval '1 second' WHERE conversation=$1",
        conversation,
    )
    lapsed = await _ask(operator, "reply", conversation, "ada", text="still there?")
    assert lapsed.status == "refused" and "is not claimed" in lapsed.reason
    taken = await _ask(operator, "claim", conversation, "bob")
    assert taken.status == "ok" and taken.claimed_by == "bob"
    closed = await asyncio.to_thread(team.corral, "close", conversation, "--by", "bob", "--note", "spam")
    assert closed.returncode == 0, closed.stdout + closed.stderr
    rows = await team.sql("SELECT status, reason FROM conversations WHERE id=$1", conversation)
    assert tuple(rows[0]) == ("closed", "closed by bob: spam")
    again = await _ask(operator, "claim", conversation, "ada")
    assert (
        again.status == "refused"
        and again.reason == f"conversation {conversation} is closed, not in the human queue"
    )


async def test_a_reply_sent_again_after_its_record_was_lost_is_one_turn(team: Stack, operator: Bus) -> None:
    """The supervisor saves a reply, then records the action (its id, the audit); if it dies
    in between, the operator's command sends the same request again: one turn, not two."""
    conversation = await _escalated(team)
    assert (await _ask(operator, "claim", conversation, "ada")).status == "ok"
    message = OperatorRequest(action="reply", conversation=conversation, by="ada", id="o-once", text="On it.")
    first = await request(operator.nc, subjects.operator_requests(), message, OperatorAnswer, timeout_s=30)
    assert first.status == "ok", first
    await team.sql("DELETE FROM operator_actions WHERE id='o-once'")  # as if it was never recorded
    again = await request(operator.nc, subjects.operator_requests(), message, OperatorAnswer, timeout_s=30)
    assert again.status == "ok", again
    rows = await team.sql("SELECT turns::text AS t FROM conversations WHERE id=$1", conversation)
    assert [t["text"] for t in json.loads(rows[0]["t"]) if t["role"] == "human"] == ["On it."]
    # While the customer has not answered, ada may follow up (another id: another turn).
    assert (await _ask(operator, "reply", conversation, "ada", text="Still there?")).status == "ok"
    rows = await team.sql("SELECT turns::text AS t FROM conversations WHERE id=$1", conversation)
    assert [t["text"] for t in json.loads(rows[0]["t"]) if t["role"] == "human"] == ["On it.", "Still there?"]

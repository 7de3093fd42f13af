"""One trace per conversation, across every process: a three-turn conversation through the
API, exported over OTLP/HTTP to the test's own receiver (decoded with opentelemetry-proto)
and stored in corral's own span store; no message content unless the operator opts in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest

from corral.bus import DEAD_REASON, subjects
from corral.bus.spans import CONTENT_ATTRIBUTES, trace_id_of
from tests.conftest import eventually
from tests.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver
from tests.span_records import span_message, span_record
from tests.stack import Stack, running_stack

TURNS = (
    "Hi. My email is ben@example.com and my order is 2030.",
    "My email is dee@example.com and my order is 2030.",
    "Please refund order 2030, it broke",
)

PROCESSES = {
    "corral-api",
    "corral-supervisor",
    "corral-agent-triage",
    "corral-agent-payments",
    "corral-agent-account_manager",
    "corral-router",
}
EXPECTED = {
    "invoke_workflow conversation",
    "supervisor.decide start",
    "supervisor.decide message",
    "supervisor.decide handoff.proposed",
    "supervisor.decide agent.reply",
    "invoke_agent triage",
    "invoke_agent payments",
    "invoke_agent account_manager",
    "execute_tool verify_customer",
    "policy verify_customer",
    "execute_tool refund",
    "policy refund",
    "execute_tool transfer_to_payments",
}


@dataclass
class Traced:
    stack: Stack
    receiver: Receiver
    api: httpx.AsyncClient
    conversation: str


@pytest.fixture(scope="module")
async def traced(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> AsyncIterator[Traced]:
    with otlp_receiver() as receiver:
        environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
        async with running_stack(
            tmp_path_factory.mktemp("state"), module_database_url, None, environment=environment
        ) as stack:
            made = stack.corral("api-key", "create", "--client", "web", "--json")
            assert made.returncode == 0, made.stdout + made.stderr
            runtime = stack.runtime()
            assert runtime is not None
            headers = {"Authorization": f"Bearer {json.loads(made.stdout)['key']}"}
            async with httpx.AsyncClient(base_url=runtime["api_url"], headers=headers, timeout=60) as api:
                started = await api.post("/v1/conversations", json={"text": TURNS[0]})
                assert started.status_code == 201, started.text
                conversation = started.json()["conversation"]
                for said, text in enumerate(TURNS[1:], 1):
                    await _settled(api, conversation, "awaiting_customer", 2 * said)
                    sent = await api.post(f"/v1/conversations/{conversation}/messages", json={"text": text})
                    assert sent.status_code == 202, sent.text
                await _settled(api, conversation, "replied", 2 * len(TURNS))
                yield Traced(stack, receiver, api, conversation)


async def _settled(api: httpx.AsyncClient, conversation: str, status: str, turns: int) -> None:
    async def settled() -> bool:
        view = (await api.get(f"/v1/conversations/{conversation}")).json()
        return bool(view["status"] == status and len(view["transcript"]) >= turns)

    await eventually(settled, timeout=60, message=f"{conversation} {status} after {turns} turns")


def _by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    found = [s for s in spans if s.name == name]
    assert found, f"no {name!r} among {sorted({s.name for s in spans})}"
    return found


async def _all_exported(traced: Traced) -> list[ReceivedSpan]:
    trace = f"{trace_id_of(traced.conversation):032x}"

    def complete() -> list[ReceivedSpan] | None:
        # Each process sends its spans in its own time: wait for every one's.
        spans = traced.receiver.of_trace(trace)
        turns = [s for s in spans if s.name == "invoke_workflow conversation"]
        if len(turns) < len(TURNS) or not EXPECTED <= {s.name for s in spans}:
            return None
        return spans if PROCESSES <= {s.service for s in spans} else None

    return await eventually(complete, timeout=30, message="the conversation's spans exported")


async def test_a_conversation_is_one_trace_across_the_api_the_supervisor_the_agents_and_the_router(
    traced: Traced,
) -> None:
    spans = await _all_exported(traced)
    # Every span that names the conversation is in its trace, and there are no others.
    named = [
        s for s in traced.receiver.spans if s.attributes.get("gen_ai.conversation.id") == traced.conversation
    ]
    assert {s.trace_id for s in named} == {f"{trace_id_of(traced.conversation):032x}"}
    assert PROCESSES <= {s.service for s in spans}
    by_id = {s.span_id: s for s in spans}

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_id in by_id, f"{span.name} of {span.service}: its parent was not exported"
        return by_id[span.parent_id]

    # Each customer turn enters at the API, and the supervisor decides on it.
    turns = _by_name(spans, "invoke_workflow conversation")
    assert [t.attributes["corral.event"] for t in turns].count("message") == 2
    assert all(t.service == "corral-api" and t.parent_id == "" for t in turns)
    assert parent(_by_name(spans, "supervisor.decide start")[0]).name == "invoke_workflow conversation"
    # An agent's step is under the supervisor's decision that gave it the task.
    for step in _by_name(spans, "invoke_agent payments"):
        assert parent(step).name.startswith("supervisor.decide")
        assert step.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert step.attributes["gen_ai.agent.name"] == "payments"
    # Model attempts under the step, with their usage.
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert chats and all(parent(c).name.startswith("invoke_agent ") for c in chats)
    for chat in chats:
        attributes = chat.attributes
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "scripted"
        assert attributes["gen_ai.request.model"].startswith("scripted/")
        assert attributes["gen_ai.usage.input_tokens"] > 0 and "gen_ai.usage.output_tokens" in attributes
        assert "corral.tier" in attributes and "corral.cost_usd" in attributes
    # A tool call: the agent's execute_tool (the model's call id), the gateway's policy under it.
    refund = _by_name(spans, "execute_tool refund")[0]
    assert refund.service == "corral-agent-payments" and parent(refund).name == "invoke_agent payments"
    assert refund.attributes["gen_ai.tool.name"] == "refund" and refund.attributes["gen_ai.tool.call.id"]
    assert refund.attributes["corral.decision"] == "ok" and refund.attributes["corral.idempotency_key"]
    policy = _by_name(spans, "policy refund")[0]
    assert parent(policy) == refund
    assert policy.attributes["corral.policy_ids"] and policy.attributes["corral.dry_run"] is False
    # A handoff is a transfer tool, and the supervisor's decision on it is under it.
    transfer = _by_name(spans, "execute_tool transfer_to_payments")[0]
    assert transfer.attributes["corral.handoff.target"] == "payments"
    assert 0 < transfer.attributes["corral.confidence"] <= 1
    decided = [s for s in spans if s.parent_id == transfer.span_id]
    assert [s.name for s in decided] == ["supervisor.decide handoff.proposed"]
    assert decided[0].attributes["corral.decision"] == "running"
    assert decided[0].attributes["corral.next_agent"] == "payments"


async def test_no_message_content_is_recorded_unless_opted_in(traced: Traced) -> None:
    spans = await _all_exported(traced)
    for span in spans:
        assert not CONTENT_ATTRIBUTES & span.attributes.keys(), span
        text = json.dumps(span.attributes)
        assert "dee@example.com" not in text and "it broke" not in text, span


async def test_corrals_own_store_keeps_the_trace_by_conversation(traced: Traced) -> None:
    exported = await _all_exported(traced)

    async def stored() -> list[Any] | None:
        rows = await traced.stack.sql(
            "SELECT span_id, trace_id, service FROM spans WHERE conversation=$1", traced.conversation
        )
        return rows if len(rows) >= len(exported) else None

    rows = await eventually(stored, timeout=30, message="the spans stored")
    assert {r["span_id"] for r in rows} >= {s.span_id for s in exported}
    assert {r["trace_id"] for r in rows} == {f"{trace_id_of(traced.conversation):032x}"}
    # Each under the identity whose own subject carried it.
    assert {r["service"] for r in rows} >= {"api", "supervisor", "agent-triage", "router"}


async def test_corral_trace_prints_the_conversation_as_a_tree_and_as_data(traced: Traced) -> None:
    await test_corrals_own_store_keeps_the_trace_by_conversation(traced)
    shown = await asyncio.to_thread(traced.stack.corral, "trace", traced.conversation, "--json")
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)

    def walk(nodes: list[dict[str, Any]], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        for node in nodes:
            yield depth, node
            yield from walk(node["children"], depth + 1)

    nodes = list(walk(document["spans"]))
    # The three turns are the roots; every other span is under one of them.
    assert [n["name"] for d, n in nodes if d == 0] == ["invoke_workflow conversation"] * len(TURNS)
    refund = next(n for _, n in nodes if n["name"] == "execute_tool refund")
    assert [c["name"] for c in refund["children"]] == ["policy refund"]
    assert refund["attributes"]["corral.policy_ids"] and refund["duration_ms"] >= 0
    chat = next(n for _, n in nodes if n["name"].startswith("chat "))
    assert chat["attributes"]["gen_ai.usage.input_tokens"] > 0 and chat["attributes"]["corral.tier"]
    tree = await asyncio.to_thread(traced.stack.corral, "trace", traced.conversation)
    assert tree.returncode == 0, tree.stderr
    for shown_line in (
        "invoke_agent payments",
        "execute_tool transfer_to_payments",
        "policy refund",
        "tier ",
    ):
        assert shown_line in tree.stdout, tree.stdout
    unknown = await asyncio.to_thread(traced.stack.corral, "trace", "c-nope")
    assert unknown.returncode == 2 and "no conversation 'c-nope'" in unknown.stderr + unknown.stdout


async def test_a_hostile_agents_spans_cost_only_its_own(traced: Traced) -> None:
    """An agent may send anything on its own spans subject. A span that could be neither
    stored nor exported (an id OTLP has no room for, a time past any timestamp, a text
    PostgreSQL refuses) is dead-lettered with why; the agent's next spans, and everyone
    else's, are stored and exported as before, under the agent's name whatever they claim."""
    trace = f"{trace_id_of('c-hostile'):032x}"
    good = span_record(
        "00000000000000a1",
        trace_id=trace,
        # What rich would read as markup, and figures that are not numbers.
        name="invoke_agent [/bold][red]triage",
        attributes={"gen_ai.conversation.id": "c-hostile", "corral.cost_usd": "lots"},
        service="corral-supervisor",
    )
    agent = await traced.stack.connect("agent-triage")
    try:
        subject = subjects.spans("agent-triage")
        for bad in (
            msgspec.structs.replace(good, trace_id="ab" * 20),
            msgspec.structs.replace(good, start_ns=10**30),
        ):
            await agent.js.publish(subject, span_message(bad))
        # Fetched and stored together with the next one, which must not wait on it.
        nul = msgspec.structs.replace(good, span_id="00000000000000b2", name="invoke_agent \x00")
        await agent.js.publish(subject, span_message(nul))
        await agent.js.publish(subject, span_message(good))
    finally:
        await agent.close()

    async def stored() -> list[Any]:
        return await traced.stack.sql("SELECT service FROM spans WHERE trace_id = $1", trace)

    assert [r["service"] for r in await eventually(stored, message="the good span stored")] == [
        "agent-triage"
    ]
    exported = await eventually(lambda: traced.receiver.of_trace(trace), message="the good span exported")
    assert [s.service for s in exported] == ["corral-agent-triage"]
    shown = await asyncio.to_thread(traced.stack.corral, "trace", "c-hostile")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "invoke_agent [/bold][red]triage" in shown.stdout and "$lots" in shown.stdout
    admin = await traced.stack.connect("admin")
    try:
        info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
        reasons = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await admin.js.get_msg(subjects.DEAD_LETTER_STREAM, seq)
            if msg.subject == subjects.dead_letter(subject):
                reasons.append((msg.headers or {}).get(DEAD_REASON, ""))
    finally:
        await admin.close()
    assert len(reasons) == 3, reasons
    assert [reason.split(":")[0] for reason in reasons] == [
        "decode error",
        "decode error",
        "cannot be stored",
    ]

"""End to end: `corral up` runs the supervisor and four agents as separate OS processes
against a real nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import yaml

from corral.bus import DEAD_REASON, Bus, BusConfig, connect, encode, subjects
from corral.bus._messages import AgentReply, OutputTaken
from corral.supervisor import EmbeddedNats, send_and_wait
from corral.supervisor.cli._demo import _check_expectation
from tests.conftest import SAMPLE_CONFIG, eventually
from tests.stack import Stack, running_stack

# Samples that wait for an approval are exercised in test_tools_team.py.
SCENARIOS = [
    s
    for s in yaml.safe_load((SAMPLE_CONFIG.parent / "scenarios.yaml").read_text())["conversations"]
    if not s.get("approve")
]


@pytest.fixture(scope="module")
async def stack(
    module_nats: EmbeddedNats, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    # An external (open) NATS: the path of a user who brings their own server.
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, module_nats.url) as stack:
        yield stack


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[stack.nats_url], reconnect_forever=False))
    yield bus
    await bus.close()


async def test_every_process_is_separate_and_alive(stack: Stack) -> None:
    runtime = stack.runtime()
    assert runtime is not None
    pids = {c["name"]: c["pid"] for c in runtime["children"]}
    assert set(pids) == {
        "supervisor",
        "router",
        "api",
        "triage",
        "payments",
        "tech_support",
        "account_manager",
    }
    assert len(set(pids.values())) == 7 and stack.process.pid not in pids.values()
    for pid in pids.values():
        os.kill(pid, 0)


async def test_agents_hold_no_provider_key_and_no_litellm(stack: Stack) -> None:
    """The model gateway alone holds provider keys and imports litellm: an agent's
    environment has no key (the stack was started with one set) and its process never
    loaded litellm."""
    runtime = stack.runtime()
    assert runtime is not None
    pids = {c["name"]: c["pid"] for c in runtime["children"]}

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

    def loaded(pid: int, name: str) -> bool:
        return name in Path(f"/proc/{pid}/maps").read_text()

    assert environ(pids["router"]).get("OPENAI_API_KEY") == "sk-test-not-for-agents"
    # The API holds no provider key and no database credentials either: what it reads, it
    # asks the supervisor for.
    for agent in ("triage", "payments", "tech_support", "account_manager", "api"):
        env = environ(pids[agent])
        assert not any("postgres" in value for value in env.values()), agent
        assert "OPENAI_API_KEY" not in env and "DATABASE_URL" not in env, agent
        assert not any("sk-test-not-for-agents" in value for value in env.values()), agent
        # litellm pulls in tiktoken's compiled extension when imported: absent from agents.
        assert not loaded(pids[agent], "tiktoken"), agent
        assert not loaded(pids[agent], "tokenizers"), agent


async def test_sample_conversations_take_the_expected_paths(stack: Stack, client: Bus) -> None:
    results = await asyncio.gather(
        *(send_and_wait(client, s["text"], customer=s["customer"], timeout_s=90) for s in SCENARIOS)
    )
    for sample, ended in zip(SCENARIOS, results, strict=True):
        assert _check_expectation(ended, sample["expect"]) is None, (sample["name"], ended)
    appearing = {hop.agent for ended in results for hop in ended.path}
    assert appearing == {"triage", "payments", "tech_support", "account_manager"}
    refund = results[0]
    assert [hop.confidence for hop in refund.path] == [None, 0.93, 0.91]


async def test_refused_edge_is_recorded_and_the_client_told_why(stack: Stack) -> None:
    result = await asyncio.to_thread(
        stack.corral,
        "send",
        "--wait",
        "--timeout",
        "90",
        "--customer",
        "cus_9",
        "The app crashed during checkout and I want a refund.",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "status: refused" in out
    assert (
        "handoff tech_support -> payments refused: not an allowed edge of the graph "
        "(allowed from tech_support: account_manager)" in out
    )
    conversation = re.search(r"conversation (c-[0-9a-f]+)", out)
    assert conversation is not None
    conn = await asyncpg.connect(stack.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, reason FROM conversations WHERE id=$1", conversation.group(1)
        )
        steps = await conn.fetch(
            "SELECT agent, kind, target FROM conversation_steps WHERE conversation=$1 ORDER BY id",
            conversation.group(1),
        )
    finally:
        await conn.close()
    assert row["status"] == "refused" and "tech_support -> payments" in row["reason"]
    assert [tuple(s) for s in steps] == [
        ("triage", "started", None),
        ("triage", "forwarded", "tech_support"),
        ("tech_support", "refused", "payments"),
    ]


async def test_send_wait_replies_with_exit_zero(stack: Stack) -> None:
    result = await asyncio.to_thread(
        stack.corral, "send", "--wait", "--timeout", "90", "How do I change my email address?"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "path: triage -> account_manager (0.90)" in out
    assert "reply: You can change your email under Settings" in out


async def test_poison_messages_on_supervisor_subjects_are_dead_lettered(stack: Stack, client: Bus) -> None:
    before = (await client.js.stream_info(subjects.DEAD_LETTER_STREAM)).state.last_seq
    await client.js.publish(subjects.conversation_start("client", "poison1"), b"\xff\x00 not json")
    # An agent's output is a request: the supervisor answers why it refused it.
    triage = await stack.connect(subjects.agent_identity("triage"))
    try:
        answer = await triage.nc.request(
            subjects.agent_reply("triage"),
            encode(AgentReply(conversation="no-such-conversation", step=1, agent="triage", text="hi")),
            timeout=30,
        )
    finally:
        await triage.close()
    taken = msgspec.json.decode(answer.data, type=OutputTaken)
    assert taken.status == "refused" and "unknown conversation 'no-such-conversation'" in taken.reason
    ended = await send_and_wait(client, "How do I change my email address?", timeout_s=90)
    assert ended.status == "replied"

    async def _dead() -> list[tuple[str, str]] | None:
        info = await client.js.stream_info(subjects.DEAD_LETTER_STREAM)
        if info.state.last_seq < before + 2:
            return None
        out = []
        for seq in range(before + 1, info.state.last_seq + 1):
            msg = await client.js.get_msg(subjects.DEAD_LETTER_STREAM, seq)
            out.append((msg.subject or "", (msg.headers or {})[DEAD_REASON]))
        return out

    dead = dict(await eventually(_dead, message="two dead letters"))
    assert dead[subjects.dead_letter(subjects.conversation_start("client", "poison1"))].startswith(
        "decode error"
    )
    assert (
        "unknown conversation 'no-such-conversation'"
        in dead[subjects.dead_letter(subjects.agent_reply("triage"))]
    )


async def test_killed_agent_is_restarted_and_the_waiting_conversation_completes(
    stack: Stack, client: Bus
) -> None:
    before = stack.child("payments")
    os.kill(before["pid"], signal.SIGKILL)
    # The refund needs payments, which is dead right now: the task waits in its inbox.
    ended = await send_and_wait(client, "Please refund the duplicate charge.", timeout_s=90)
    assert ended.status == "replied"
    assert [hop.agent for hop in ended.path] == ["triage", "payments", "account_manager"]
    after = stack.child("payments")
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    assert after["last_exit"] == -signal.SIGKILL
    log = stack.log.read_text()
    assert f"payments (pid {before['pid']}) exited with signal SIGKILL; restart 1" in log


async def test_status_lists_processes_streams_and_consumers(stack: Stack) -> None:
    result = await asyncio.to_thread(stack.corral, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["running"] is True
    assert {p["name"] for p in report["processes"] if p["alive"]} == {
        "supervisor",
        "router",
        "api",
        "triage",
        "payments",
        "tech_support",
        "account_manager",
    }
    assert {s["name"] for s in report["streams"]} == {"CORRAL_WORK", "CORRAL_EVENTS", "CORRAL_DLQ"}
    consumers = {c["name"]: c for c in report["consumers"]}
    assert set(consumers) == {
        "supervisor",
        "agent-triage",
        "agent-payments",
        "agent-tech_support",
        "agent-account_manager",
    }
    assert all("pending" in c for c in consumers.values())


async def test_one_trace_follows_the_conversation_across_processes(stack: Stack, client: Bus) -> None:
    from corral.bus import trace_id

    # The agents' step events are live (not stored): listen before the conversation starts.
    # (This stack's server is open; with credentials only operators could listen here.)
    seen: list[tuple[str, bytes, str | None]] = []

    async def _on_message(msg: Any) -> None:
        seen.append((msg.subject, msg.data, trace_id((msg.headers or {}).get("traceparent"))))

    sub = await client.nc.subscribe("corral.>", cb=_on_message)
    try:
        ended = await send_and_wait(client, "Please refund the duplicate charge.", timeout_s=90)
        conversation = ended.conversation.encode()

        wanted = {
            subjects.agent_event("triage"),
            subjects.agent_event("payments"),
            subjects.agent_event("account_manager"),
            subjects.conversation_updates("client", ended.conversation),
            subjects.conversation_progress("client", ended.conversation),
        }

        def _events() -> list[tuple[str, str | None]] | None:
            # The three agents' step events, the progress (forwards, the tool decision), the end.
            found = [
                (s, t) for s, data, t in seen if conversation in data and (".event" in s or ".out." in s)
            ]
            return found if wanted <= {s for s, _ in found} else None

        found = await eventually(_events, message="the agents' events, the progress and the end")
    finally:
        await sub.unsubscribe()
    trace_ids = {t for _, t in found}
    assert len(trace_ids) == 1 and None not in trace_ids

"""Size: no message can stop a process. Every publish and request is checked against the
server's ``max_payload`` with its headers (a size error is never retried), a hostile
model's huge reply ends its step with the reason, dead letters are bounded, and a process
whose connection is closed for good exits non-zero so that it is restarted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from corral.agents import AgentService, AgentSettings
from corral.bus import (
    DEAD_REASON,
    DEAD_TRUNCATED,
    MSG_ID,
    AgentFailed,
    AgentOutput,
    AgentReply,
    AgentTask,
    Bus,
    BusConfig,
    ConnectionClosedError,
    ConnectionGuard,
    ConversationEnded,
    ConversationStart,
    Limits,
    OutputTaken,
    PayloadTooLargeError,
    connect,
    encode,
    ensure_topology,
    publish,
    request,
    subjects,
)
from corral.router import ScriptedModel, ScriptRule, ScriptRules
from corral.supervisor.core._client import watching
from corral.supervisor.core._outputs import OutputDesk
from corral.supervisor.stack._embedded import EmbeddedNats
from tests.conftest import SAMPLE_CONFIG, eventually
from tests.model_gateway import model_gateway


@pytest.fixture
async def admin(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(bus.js, ["triage"])
    yield bus
    await bus.close()


async def test_a_message_over_max_payload_with_its_headers_is_refused_before_it_is_sent(admin: Bus) -> None:
    limit = admin.nc.max_payload
    # The body alone fits (nats-py would send it); with its headers it does not, and the
    # server would close the connection for it.
    task = AgentTask(conversation="c1", step=1, agent="triage", text="")
    padding = limit - len(encode(task)) - 10
    task = AgentTask(conversation="c1", step=1, agent="triage", text="x" * padding)
    assert len(encode(task)) < limit
    with pytest.raises(PayloadTooLargeError) as raised:
        await publish(admin.js, subjects.agent_inbox("triage"), task, msg_id="c1.1.task")
    assert not raised.value.retryable
    assert raised.value.size > limit == raised.value.limit
    with pytest.raises(PayloadTooLargeError):
        await request(
            admin.nc, "corral.anything", b"x" * (limit - 5), OutputTaken, timeout_s=1, headers={MSG_ID: "abc"}
        )
    # The connection is still open, and still works.
    assert admin.nc.is_connected
    ok = msgspec.structs.replace(task, text="ok")
    await publish(admin.js, subjects.agent_inbox("triage"), ok, msg_id="c1.1.ok")


async def test_a_closed_connection_ends_a_service(nats_server: EmbeddedNats, admin: Bus) -> None:
    bus = await connect(BusConfig(servers=[nats_server.url], identity="agent-triage"))
    agent = AgentService(AgentSettings(name="triage", instructions="Route."), bus)
    serving = asyncio.create_task(agent.run())

    async def _fetching() -> bool:
        info = await admin.js.consumer_info(subjects.WORK_STREAM, subjects.agent_consumer("triage"))
        return bool(info.num_waiting)

    await eventually(_fetching, message="the agent fetching its inbox")
    # A protocol violation makes the server close the connection for good (nats-py does not
    # reconnect after it): the server reloads with a tiny max_payload, and the agent's next
    # fetch is over it.
    nats_server.write_config("max_payload: 16\n")
    nats_server.reload()
    with pytest.raises(ConnectionClosedError, match="closed for good"):
        await asyncio.wait_for(serving, timeout=15)
    assert bus.lost


async def test_a_guard_on_a_connection_closed_on_purpose_just_stops(nats_server: EmbeddedNats) -> None:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    guard = ConnectionGuard(bus)
    watching = asyncio.create_task(guard.run())
    await bus.close()
    assert not bus.lost
    await guard.shutdown()
    await asyncio.wait_for(watching, timeout=5)


@pytest.mark.parametrize(
    ("service", "serving"),
    [
        (["agent", "run", "triage"], "serving corral.agent.triage.inbox"),
        (["supervisor", "run"], "supervisor serving"),
    ],
    ids=["agent", "supervisor"],
)
async def test_a_process_whose_connection_is_closed_exits_non_zero(
    tmp_path: Path, database_url: str, service: list[str], serving: str
) -> None:
    """`corral agent run` / `corral supervisor run` against a server that closes its
    connection for good: the server reloads with a smaller ``max_payload``, the process's
    next fetch is over it, and the server closes the connection for the violation (nats-py
    does not reconnect after it). The process exits 1, so a launcher restarts it; before,
    it stayed alive, logging ``connection closed; retrying`` forever."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        admin = await connect(BusConfig(servers=[server.url], reconnect_forever=False))
        await ensure_topology(admin.js, ["triage"])
        await admin.close()
        env = {k: v for k, v in os.environ.items() if k not in {"CORRAL_CREDS", "CORRAL_PARENT_PID"}}
        env.update(NATS_URL=server.url, DATABASE_URL=database_url, CORRAL_STATE_DIR=str(tmp_path / "state"))
        log = tmp_path / "service.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "corral.supervisor", *service, "-c", str(SAMPLE_CONFIG)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            await eventually(
                lambda: serving in log.read_text() or process.poll() is not None,
                timeout=60,
                message="the process serving",
            )
            assert process.poll() is None, log.read_text()
            server.write_config("max_payload: 16\n")
            server.reload()
            code = await eventually(lambda: process.poll(), timeout=30, message="the process exited")
            assert code == 1, log.read_text()
            assert "closed for good" in log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        server.stop()


async def test_a_hostile_models_huge_reply_ends_the_step_with_the_reason(
    nats_server: EmbeddedNats, admin: Bus
) -> None:
    """A 600 KB reply (and its journaled copy) is over 1 MB: it is not sent again and again;
    the step fails once, with the reason, and its journaled response cut to the limit."""
    huge = "y" * 600_000
    rules = ScriptRules(
        agents={"triage": [ScriptRule(answer={"action": "reply", "text": huge, "confidence": 0.9})]}
    )
    bus = await connect(
        BusConfig(servers=[nats_server.url], identity="agent-triage", reconnect_forever=False)
    )
    agent = AgentService(AgentSettings(name="triage", instructions="Answer."), bus)
    gateway = model_gateway(nats_server, {"fast": ScriptedModel(rules)}, [agent.settings])
    ledger = await gateway.__aenter__()
    seen: list[tuple[str, AgentOutput]] = []
    decoder = msgspec.json.Decoder(AgentOutput)

    async def supervisor(msg: Msg) -> None:
        seen.append((msg.subject, decoder.decode(msg.data)))
        await msg.respond(encode(OutputTaken(status="taken")))

    subs = [
        await admin.nc.subscribe(subjects.agent_reply("triage"), cb=supervisor),
        await admin.nc.subscribe(subjects.agent_error("triage"), cb=supervisor),
    ]
    serving = asyncio.create_task(agent.run())
    await publish(
        admin.js,
        subjects.agent_inbox("triage"),
        AgentTask(conversation="c9", step=1, agent="triage", text="tell me everything"),
        msg_id="c9.1.task",
    )

    async def _acked() -> bool:
        info = await admin.js.consumer_info(subjects.WORK_STREAM, subjects.agent_consumer("triage"))
        return bool(seen) and info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(_acked, message="the step ended and its task acked")
    await agent.shutdown()
    await serving
    for sub in subs:
        await sub.unsubscribe()
    await bus.close()
    await gateway.__aexit__(None, None, None)
    assert len(seen) == 1
    subject, output = seen[0]
    assert subject == subjects.agent_error("triage") and isinstance(output, AgentFailed)
    assert "exceeds limits.response_text_bytes (65536)" in output.reason
    # The model gateway journaled the answer (it was paid for), cut to the limit.
    [journaled] = ledger.recorded
    assert len(journaled.text.encode()) <= 64 * 1024 and not journaled.tool_calls
    assert "cut by corral" in journaled.text


async def test_dead_letters_are_bounded_and_say_they_were_cut(nats_server: EmbeddedNats, admin: Bus) -> None:
    """An output as big as the server takes is refused, kept in CORRAL_DLQ cut to the bound
    with its original size, and CORRAL_DLQ itself has limits of bytes, age and size."""

    async def take(output: AgentOutput, subject: str) -> None:
        raise AssertionError("never taken")

    desk = OutputDesk(admin.nc, admin.js, take)
    serving = asyncio.create_task(desk.run())
    bus = await connect(
        BusConfig(servers=[nats_server.url], identity="agent-triage", reconnect_forever=False)
    )
    reply = AgentReply(conversation="c1", step=1, agent="triage", text="z" * (admin.nc.max_payload - 300))
    body = encode(reply)[:-1] + b',"x":[[[}'  # as big as the server takes, and broken
    answer = await bus.nc.request(subjects.agent_reply("triage"), body, timeout=10)
    assert msgspec.json.decode(answer.data, type=OutputTaken).status == "refused"
    info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
    dead = await admin.js.get_msg(subjects.DEAD_LETTER_STREAM, info.state.last_seq)
    headers = dead.headers or {}
    assert headers[DEAD_REASON].startswith("decode error")
    assert int(headers[DEAD_TRUNCATED]) > admin.nc.max_payload - 200
    assert len(dead.data or b"") == 64 * 1024
    assert info.config.max_bytes == 256 * 1024 * 1024
    assert info.config.max_age == 30 * 24 * 3600
    assert info.config.max_msg_size == 128 * 1024
    await bus.close()
    await desk.shutdown()
    await serving
    # The stream refuses anyone else's oversized dead letter outright.
    with pytest.raises(Exception, match=r"(?i)message size"):
        await admin.js.publish(subjects.agent_dead_letter("triage"), b"d" * (200 * 1024))


async def test_what_a_decision_implies_must_fit_or_the_conversation_is_escalated(
    nats_server: EmbeddedNats, admin: Bus, database_url: str
) -> None:
    """Even with limits set past the server's max_payload, nothing corral derives from an
    input is sent over it: a start whose task would not fit is refused, a reply whose
    outcome would not fit escalates its conversation (the client hears why), and the
    supervisor stays connected."""
    from corral.supervisor.core._decide import Graph
    from corral.supervisor.core._supervisor import Supervisor
    from corral.supervisor.store._store import Store

    store = await Store.open(database_url)
    bus = await connect(BusConfig(servers=[nats_server.url], identity="supervisor", reconnect_forever=False))
    big = Limits(customer_text_bytes=4 * 1024 * 1024, reply_text_bytes=4 * 1024 * 1024)
    graph = Graph(entry="triage", edges={"triage": []}, min_confidence=0.5, max_steps=5)
    supervisor = Supervisor(bus, store, graph, limits=big)
    serving = asyncio.create_task(supervisor.run())
    client = await connect(BusConfig(servers=[nats_server.url], identity="client", reconnect_forever=False))
    limit = admin.nc.max_payload
    try:
        # A start that fits, whose task (the text, the path, the headers) would not.
        start = ConversationStart(conversation="c-big", text="")
        start = ConversationStart(conversation="c-big", text="s" * (limit - len(encode(start)) - 8))
        async with watching(client, "c-big") as done:
            await client.js.publish(subjects.conversation_start("client", "c-big"), encode(start))
            ended = await asyncio.wait_for(done, 30)
        assert isinstance(ended, ConversationEnded) and ended.status == "refused"
        assert "the AgentTask it implies would be" in (ended.reason or "")
        assert f"over the server's max_payload ({limit})" in (ended.reason or "")
        # A reply that fits, whose outcome (the reply, the path, the headers) would not.
        async with watching(client, "c-small") as done:
            await client.js.publish(
                subjects.conversation_start("client", "c-small"),
                encode(ConversationStart(conversation="c-small", text="hello")),
            )

            async def _running() -> bool:
                record = await store.get("c-small")
                return record is not None and record.status == "running"

            await eventually(_running, message="the conversation running at triage")
            triage = await connect(
                BusConfig(servers=[nats_server.url], identity="agent-triage", reconnect_forever=False)
            )
            reply = AgentReply(conversation="c-small", step=1, agent="triage", text="")
            text = "r" * (limit - len(encode(reply)) - 8)
            reply = AgentReply(conversation="c-small", step=1, agent="triage", text=text)
            answer = await triage.nc.request(subjects.agent_reply("triage"), encode(reply), timeout=30)
            await triage.close()
            ended = await asyncio.wait_for(done, 30)
        assert msgspec.json.decode(answer.data, type=OutputTaken).status == "taken"
        assert isinstance(ended, ConversationEnded) and ended.status == "escalated"
        assert ended.reply is None
        assert "the ConversationEnded it implies would be" in (ended.reason or "")
        assert bus.nc.is_connected and not serving.done()
    finally:
        await client.close()
        await supervisor.shutdown()
        await serving
        await bus.close()
        await store.close()


def test_limits_are_configured_with_documented_defaults(tmp_path: Path) -> None:
    from corral.supervisor import ConfigError, load_config
    from tests.test_config import _write

    defaults = load_config(SAMPLE_CONFIG).config.limits
    assert defaults.to_limits() == Limits()
    assert (defaults.dead_letter_max_bytes, defaults.dead_letter_max_age_s) == (
        256 * 1024 * 1024,
        30 * 24 * 3600,
    )
    text = SAMPLE_CONFIG.read_text() + "\nlimits:\n  customer_text_bytes: 2048\n  reply_text_bytes: 4096\n"
    limits = load_config(_write(tmp_path, text)).config.limits.to_limits()
    assert (limits.customer_text_bytes, limits.reply_text_bytes) == (2048, 4096)
    with pytest.raises(ConfigError, match=r"limits\.dead_letter_body_bytes"):
        load_config(_write(tmp_path, SAMPLE_CONFIG.read_text() + "\nlimits:\n  dead_letter_body_bytes: 10\n"))

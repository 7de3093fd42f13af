"""The bus against a real nats-server: dead letters, dedup, trace context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from corral.bus import (
    DEAD_REASON,
    DEAD_SUBJECT,
    MSG_ID,
    TRACEPARENT,
    AgentInput,
    AgentTask,
    Bus,
    BusConfig,
    Consumer,
    ConsumerConfig,
    Delivery,
    PoisonMessageError,
    connect,
    current_traceparent,
    ensure_topology,
    new_traceparent,
    publish,
    subjects,
)
from corral.supervisor import EmbeddedNats
from tests.conftest import eventually


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(bus.js, ["triage"])
    yield bus
    await bus.close()


async def _dead_letters(bus: Bus) -> list[tuple[str, dict[str, str], bytes]]:
    info = await bus.js.stream_info(subjects.DEAD_LETTER_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await bus.js.get_msg(subjects.DEAD_LETTER_STREAM, seq)
        out.append((msg.subject or "", dict(msg.headers or {}), msg.data or b""))
    return out


def _task(conversation: str) -> AgentTask:
    return AgentTask(conversation=conversation, step=1, agent="triage", text="hello")


async def test_poison_messages_are_dead_lettered_and_the_next_is_served(bus: Bus) -> None:
    seen: list[tuple[AgentTask, str | None]] = []

    async def handler(task: AgentTask, delivery: Delivery) -> None:
        if task.conversation == "reject-me":
            raise PoisonMessageError("handler refuses this one", subject=delivery.subject)
        seen.append((task, current_traceparent()))

    inbox = subjects.agent_inbox("triage")
    consumer: Consumer[AgentTask] = Consumer(
        bus.js,
        ConsumerConfig(stream=subjects.WORK_STREAM, durable=subjects.agent_consumer("triage")),
        msgspec.json.Decoder(AgentInput),
        handler,
    )
    runner = asyncio.create_task(consumer.run())
    trace = new_traceparent()
    await bus.js.publish(inbox, b"{not json", headers={MSG_ID: "p1", TRACEPARENT: trace})
    await bus.js.publish(inbox, b'{"type": "agent.task", "conversation": "c0"}', headers={MSG_ID: "p2"})
    await bus.js.publish(inbox, b'{"type": "rocket.launch"}', headers={MSG_ID: "p3"})
    await publish(bus.js, inbox, _task("reject-me"), msg_id="p4")
    await publish(bus.js, inbox, _task("c1"), msg_id="ok1", traceparent=trace)

    await eventually(lambda: seen, message="the valid message after the poison")
    dead = await eventually(lambda: _four(bus), message="four dead letters")
    await consumer.shutdown()
    await runner

    assert [task.conversation for task, _ in seen] == ["c1"]
    assert seen[0][1] == trace  # trace context carried into the handler
    assert all(subject == subjects.dead_letter(inbox) for subject, _, _ in dead)
    assert all(headers[DEAD_SUBJECT] == inbox for _, headers, _ in dead)
    reasons = [headers[DEAD_REASON] for _, headers, _ in dead]
    assert reasons[0].startswith("decode error: JSON is malformed")
    assert "missing required field" in reasons[1]
    assert "Invalid value 'rocket.launch'" in reasons[2]
    assert reasons[3] == "PoisonMessageError: handler refuses this one"
    assert dead[0][2] == b"{not json"  # the original bytes are kept
    assert dead[0][1][TRACEPARENT] == trace
    # Nothing stays pending or gets redelivered.
    info = await bus.js.consumer_info(subjects.WORK_STREAM, subjects.agent_consumer("triage"))
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def _four(bus: Bus) -> list[tuple[str, dict[str, str], bytes]] | None:
    dead = await _dead_letters(bus)
    return dead if len(dead) == 4 else None


async def test_republish_with_same_id_is_deduplicated(bus: Bus) -> None:
    inbox = subjects.agent_inbox("triage")
    for _ in range(3):
        await publish(bus.js, inbox, _task("dup"), msg_id="dup.1.task")
    info = await bus.js.stream_info(subjects.WORK_STREAM)
    assert info.state.messages == 1


async def test_topology_is_idempotent(bus: Bus) -> None:
    await ensure_topology(bus.js, ["triage", "payments"])
    await ensure_topology(bus.js, ["triage", "payments"])
    names = {c.name for c in await bus.js.consumers_info(subjects.WORK_STREAM)}
    assert names == {"supervisor", "agent-triage", "agent-payments"}


async def test_a_message_jetstream_gives_up_on_is_dead_lettered_with_an_alert(
    nats_server: EmbeddedNats,
) -> None:
    """A consumer that keeps dying never dead-letters its message itself: the
    MAX_DELIVERIES advisory does, and raises an alert."""
    from corral.bus import Alert, MaxDeliveriesWatcher, TopologyConfig

    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(bus.js, ["triage"], TopologyConfig(ack_wait_s=0.3, max_deliver=2))
    dead: list[tuple[str, str]] = []

    async def on_dead(subject: str, data: bytes, reason: str) -> None:
        dead.append((subject, reason))

    alerts: list[bytes] = []

    async def on_alert(msg: Any) -> None:
        alerts.append(msg.data)

    await bus.nc.subscribe(subjects.alerts(), cb=on_alert)
    watcher = MaxDeliveriesWatcher(bus.nc, bus.js, subjects.WORK_STREAM, on_dead)
    watching = asyncio.create_task(watcher.run())
    inbox = subjects.agent_inbox("triage")
    await publish(bus.js, inbox, _task("c-crashy"), msg_id="crashy")
    # A "process" that fetches the step and dies before acking, every time.
    sub = await bus.js.pull_subscribe_bind(
        durable=subjects.agent_consumer("triage"), stream=subjects.WORK_STREAM
    )

    # It keeps asking for work (as a restarted process does); each delivery goes unacked.
    async def _fetching_until_dead() -> bool:
        await _fetch_one(sub)
        return bool(dead)

    await eventually(_fetching_until_dead, message="the dead letter")
    assert dead[0][0] == inbox and "gave up after 2 deliveries to agent-triage" in dead[0][1]
    letters = await _dead_letters(bus)
    assert [(s, h[DEAD_SUBJECT]) for s, h, _ in letters] == [(subjects.dead_letter(inbox), inbox)]
    assert (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 0
    await eventually(lambda: alerts, message="an alert")
    alert = msgspec.json.decode(alerts[0], type=Alert)
    assert alert.kind == "max_deliveries" and alert.subject == inbox
    await watcher.shutdown()
    await watching
    await sub.unsubscribe()
    await bus.close()


async def _fetch_one(sub: Any) -> bool:
    try:
        await sub.fetch(1, timeout=0.5)
    except Exception:
        pass
    return True


async def test_a_subscription_the_server_has_seen_answers_the_very_next_request(
    nats_server: EmbeddedNats,
) -> None:
    """``server_has_seen`` is the barrier ``flush()`` is not: nats-py writes a flush's PING
    ahead of the SUB still queued for its flusher, so a request right after one flush found
    no responder about one time in twelve (the flake of the request services' tests)."""
    import nats
    import nats.errors

    from corral.bus import server_has_seen

    serving = await nats.connect(nats_server.url)
    asking = await nats.connect(nats_server.url)

    async def answer(msg: Any) -> None:
        await msg.respond(b"ok")

    try:
        for n in range(300):
            sub = await serving.subscribe(f"svc.{n}", queue="q", cb=answer)
            await server_has_seen(serving)
            reply = await asking.request(f"svc.{n}", b"?", timeout=5)
            assert reply.data == b"ok", n
            await sub.unsubscribe()
    finally:
        await serving.close()
        await asking.close()

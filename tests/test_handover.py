"""A step's output is handed to the supervisor as a request: the agent holds its task until
the output is taken, and the supervisor's desk retries, refuses and dead-letters it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.msg import Msg

from corral.agents import AgentService, AgentSettings, HandoffEdge
from corral.bus import (
    ATTEMPT,
    DEAD_REASON,
    MSG_ID,
    AgentOutput,
    AgentReply,
    AgentTask,
    Bus,
    BusConfig,
    HandoffProposed,
    OutputTaken,
    connect,
    encode,
    ensure_topology,
    publish,
    subjects,
)
from corral.router import ScriptedModel, ScriptRule, ScriptRules
from corral.supervisor import EmbeddedNats
from corral.supervisor.core._outputs import OutputDesk
from tests.conftest import eventually
from tests.model_gateway import model_gateway


@pytest.fixture
async def admin(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(bus.js, ["triage", "payments"])
    yield bus
    await bus.close()


async def _as(nats_server: EmbeddedNats, identity: str) -> Bus:
    return await connect(BusConfig(servers=[nats_server.url], identity=identity, reconnect_forever=False))


async def test_the_task_is_held_until_the_supervisor_takes_the_output(
    nats_server: EmbeddedNats, admin: Bus
) -> None:
    rules = ScriptRules(
        agents={
            "triage": [
                ScriptRule(
                    answer={"action": "handoff", "target": "payments", "confidence": 0.9, "reason": "$"}
                )
            ]
        }
    )
    agent_bus = await _as(nats_server, subjects.agent_identity("triage"))
    agent = AgentService(
        AgentSettings(name="triage", instructions="Route.", edges=[HandoffEdge(target="payments")]),
        agent_bus,
    )
    gateway = model_gateway(nats_server, {"fast": ScriptedModel(rules)}, [agent.settings])
    await gateway.__aenter__()
    serving = asyncio.create_task(agent.run())
    task = AgentTask(conversation="c1", step=1, agent="triage", text="refund please")
    # No supervisor yet: nobody answers, and the agent keeps the output and its task.
    await publish(admin.js, subjects.agent_inbox("triage"), task, msg_id="c1.1.task")

    async def _held() -> bool:
        info = await admin.js.consumer_info(subjects.WORK_STREAM, subjects.agent_consumer("triage"))
        return info.num_ack_pending == 1

    await eventually(_held, message="the task delivered and held")
    seen: list[tuple[AgentOutput, dict[str, str]]] = []
    decoder = msgspec.json.Decoder(AgentOutput)

    async def supervisor(msg: Msg) -> None:
        seen.append((decoder.decode(msg.data), dict(msg.headers or {})))
        status = "retry" if len(seen) == 1 else "taken"  # busy once, then taken
        await msg.respond(encode(OutputTaken(status=status, reason="busy" if status == "retry" else "")))

    sub = await admin.nc.subscribe(subjects.agent_handoff("triage", "payments"), cb=supervisor)

    async def _acked() -> bool:
        info = await admin.js.consumer_info(subjects.WORK_STREAM, subjects.agent_consumer("triage"))
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(_acked, message="the task acked once the output was taken")
    await sub.unsubscribe()
    await agent.shutdown()
    await serving
    await agent_bus.close()
    await gateway.__aexit__(None, None, None)
    # The same output, with the same id, sent until taken; the model was asked once.
    assert len(seen) == 2
    assert all(isinstance(output, HandoffProposed) and output.target == "payments" for output, _ in seen)
    assert [headers[ATTEMPT] for _, headers in seen] == ["1", "2"]
    assert {headers[MSG_ID] for _, headers in seen} == {"c1.1.triage.out"}


async def test_the_desk_asks_again_then_dead_letters_an_output_it_cannot_take(
    nats_server: EmbeddedNats, admin: Bus
) -> None:
    async def take(output: AgentOutput, subject: str) -> None:
        raise RuntimeError("PostgreSQL is away")

    desk = OutputDesk(admin.nc, admin.js, take, max_deliver=3)
    serving = asyncio.create_task(desk.run())
    agent_bus = await _as(nats_server, subjects.agent_identity("payments"))
    reply = encode(AgentReply(conversation="c2", step=2, agent="payments", text="done"))
    answers = []
    for attempt in (1, 2, 3):
        msg = await agent_bus.nc.request(
            subjects.agent_reply("payments"), reply, timeout=10, headers={ATTEMPT: str(attempt)}
        )
        answers.append(msgspec.json.decode(msg.data, type=OutputTaken))
    # An undecodable output can never be taken: refused at once, and kept with the reason.
    garbage = await agent_bus.nc.request(subjects.agent_reply("payments"), b"{not json", timeout=10)
    await agent_bus.close()
    await desk.shutdown()
    await serving
    assert [a.status for a in answers] == ["retry", "retry", "refused"]
    assert answers[0].reason == "PostgreSQL is away"
    assert answers[2].reason == "gave up after 3 deliveries: RuntimeError: PostgreSQL is away"
    refused = msgspec.json.decode(garbage.data, type=OutputTaken)
    assert refused.status == "refused" and refused.reason.startswith("decode error")
    dead_subject = subjects.dead_letter(subjects.agent_reply("payments"))
    info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
    assert info.state.messages == 2
    first = await admin.js.get_msg(subjects.DEAD_LETTER_STREAM, info.state.first_seq)
    assert first.subject == dead_subject and first.data == reply
    assert (first.headers or {})[DEAD_REASON] == answers[2].reason

"""Poison inside an agent's step: whatever fails it for good is reported to the supervisor as
the step's failure, with the reason, instead of being dead-lettered in silence (which left
the conversation running forever)."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from agents import AgentService, AgentSettings
from bus import (
    AgentFailed,
    AgentOutput,
    AgentTask,
    BusConfig,
    OutputTaken,
    connect,
    encode,
    ensure_topology,
    publish,
    subjects,
)
from router import ScriptedModel, ScriptRule, ScriptRules
from supervisor._embedded import EmbeddedNats
from tests.conftest import eventually


async def test_a_step_that_fails_for_good_is_reported_as_failed(nats_server: EmbeddedNats) -> None:
    # The model answers with 100,000 levels of nesting: decoding it raises RecursionError,
    # which no retry can change.
    nested = '{"action": "reply", "text": "hi", "junk": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rules = ScriptRules(agents={"triage": [ScriptRule(answer=nested)]})
    admin = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(admin.js, ["triage"])
    bus = await connect(
        BusConfig(servers=[nats_server.url], identity="agent-triage", reconnect_forever=False)
    )
    agent = AgentService(AgentSettings(name="triage", instructions="Answer."), bus, ScriptedModel(rules))
    seen: list[AgentOutput] = []
    decoder = msgspec.json.Decoder(AgentOutput)

    async def supervisor(msg: Msg) -> None:
        seen.append(decoder.decode(msg.data))
        await msg.respond(encode(OutputTaken(status="taken")))

    sub = await admin.nc.subscribe(subjects.agent_error("triage"), cb=supervisor)
    serving = asyncio.create_task(agent.run())
    await publish(
        admin.js,
        subjects.agent_inbox("triage"),
        AgentTask(conversation="c7", step=1, agent="triage", text="hello"),
        msg_id="c7.1.task",
    )
    failed = await eventually(lambda: seen, message="the step reported as failed")
    await agent.shutdown()
    await serving
    await sub.unsubscribe()
    await bus.close()
    # The task was dead-lettered in the agent's own namespace, with the same reason.
    info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
    assert info.state.messages == 1
    await admin.close()
    assert len(failed) == 1 and isinstance(failed[0], AgentFailed)
    assert failed[0].conversation == "c7" and failed[0].step == 1
    assert failed[0].reason.startswith("step dead-lettered: RecursionError: maximum recursion depth")

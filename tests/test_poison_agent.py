"""Poison inside an agent's step: whatever fails it for good is reported to the supervisor as
the step's failure, with the reason, instead of being dead-lettered in silence (which left
the conversation running forever); a model that raises fails its call at the model gateway,
which says so."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.msg import Msg

from corral.agents import AgentService, AgentSettings
from corral.bus import (
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
from corral.router import Completion, CompletionRequest, ScriptedModel, ScriptRule, ScriptRules
from corral.supervisor.stack._embedded import EmbeddedNats
from tests.conftest import eventually
from tests.model_gateway import model_gateway


class Poisoned(ScriptedModel):
    """The scripted model, except that "poison" makes it fail as no retry can change."""

    async def complete(self, request: CompletionRequest) -> Completion:
        if "poison" in (request.messages[-1].content or ""):
            raise ValueError("a poisoned model")
        return await super().complete(request)


async def test_a_step_that_fails_for_good_is_reported_as_failed(nats_server: EmbeddedNats) -> None:
    # The model calls reply with 5,000 levels of nesting in its arguments: they never
    # decode, however often the model is told (and asked again).
    nested = '{"text": "hi", "confidence": 0.9, "junk": ' + "[" * 5_000 + "]" * 5_000 + "}"
    rules = ScriptRules(
        agents={"triage": [ScriptRule(answer={"action": "tool", "tool": "reply", "arguments": nested})]}
    )
    admin = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(admin.js, ["triage"])
    bus = await connect(
        BusConfig(servers=[nats_server.url], identity="agent-triage", reconnect_forever=False)
    )
    agent = AgentService(AgentSettings(name="triage", instructions="Answer."), bus)
    gateway = model_gateway(nats_server, {"fast": Poisoned(rules)}, [agent.settings])
    await gateway.__aenter__()
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
    # A step that fails in a way no retry changes, outside what the step itself reports,
    # is dead-lettered by the consumer: that too is reported as the step's failure.
    await publish(
        admin.js,
        subjects.agent_inbox("triage"),
        AgentTask(conversation="c8", step=1, agent="triage", text="poison"),
        msg_id="c8.1.task",
    )
    failed = await eventually(lambda: len(seen) >= 2 and seen, message="both steps reported as failed")
    await agent.shutdown()
    await serving
    await sub.unsubscribe()
    await bus.close()
    await gateway.__aexit__(None, None, None)
    # Nothing was dead-lettered: each step failed with the reason.
    info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
    assert info.state.messages == 0
    await admin.close()
    by_conversation = {f.conversation: f for f in failed}
    assert len(failed) == 2 and all(isinstance(f, AgentFailed) for f in failed)
    nested_failure, poisoned = by_conversation["c7"], by_conversation["c8"]
    assert isinstance(nested_failure, AgentFailed) and isinstance(poisoned, AgentFailed)
    assert nested_failure.step == 1
    assert "cannot be acted on after 2 corrections" in nested_failure.reason
    assert "maximum recursion depth" in nested_failure.reason
    assert poisoned.reason == "the model failed: the model raised ValueError('a poisoned model')"

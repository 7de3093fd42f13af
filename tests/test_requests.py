"""Typed request/reply (``RequestService``, ``request()``) against a real nats-server: the
journal and the output desk dead-letter poison requests with the reason, answer good ones
in the requester's trace context; services stop when told, and ``async with`` runs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import pytest

from corral.agents import AgentService, AgentSettings
from corral.bus import (
    DEAD_REASON,
    AgentOutput,
    AgentReply,
    AgentTask,
    Bus,
    BusConfig,
    Consumer,
    ConsumerConfig,
    ControlWatcher,
    Delivery,
    JournalQuery,
    JournalReply,
    JournalRequest,
    OutputTaken,
    Requester,
    RequestService,
    connect,
    current_traceparent,
    encode,
    ensure_control_bucket,
    ensure_topology,
    new_traceparent,
    request,
    subjects,
    use_traceparent,
)
from corral.supervisor import EmbeddedNats
from corral.supervisor.core._outputs import OutputDesk
from corral.supervisor.store._budgets import Budgets
from corral.supervisor.store._journal import JournalService
from tests.conftest import eventually

_NO_ANSWER_S = 0.5
"""How long a request waits to show that no answer comes (the deadline of the check)."""


@pytest.fixture
async def admin(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    await ensure_topology(bus.js, ["triage"])
    yield bus
    await bus.close()


@pytest.fixture
async def triage(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """A connection as agent triage: its answers arrive under its own inbox."""
    bus = await connect(
        BusConfig(
            servers=[nats_server.url], identity=subjects.agent_identity("triage"), reconnect_forever=False
        )
    )
    yield bus
    await bus.close()


class _Journal(JournalService):
    """The journal service with its database answer replaced: it says who asked, in which
    trace; the preamble (inbox check, decoding, dead letters, trace context) is the real one."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus.nc, None, Budgets())  # type: ignore[arg-type]
        self.seen: list[tuple[JournalRequest, str, str | None]] = []

    async def handle(self, request: JournalRequest, sender: str) -> JournalReply:
        self.seen.append((request, sender, current_traceparent()))
        return JournalReply(verdict="continue", reason=f"asked by {sender}")


async def _dead_reason(admin: Bus, subject: str, count: int) -> str:
    """The reason of the last dead letter of ``subject``, once ``count`` are stored."""

    async def stored() -> bool:
        info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
        return info.state.messages >= count

    await eventually(stored, message=f"{count} dead letters")
    dead = await admin.js.get_last_msg(subjects.DEAD_LETTER_STREAM, subjects.dead_letter(subject))
    return (dead.headers or {})[DEAD_REASON]


async def test_the_journal_dead_letters_poison_requests_and_answers_good_ones_in_their_trace(
    admin: Bus, triage: Bus
) -> None:
    subject = subjects.agent_journal("triage")
    query = JournalQuery(conversation="c1", step=2, agent="triage")
    async with _Journal(admin) as journal:
        with pytest.raises(nats.errors.TimeoutError):
            await triage.nc.request(subject, b"{not json", timeout=_NO_ANSWER_S)
        assert (await _dead_reason(admin, subject, 1)).startswith("decode error: ")
        # An answer asked for in another agent's inbox: kept with the reason, never sent.
        elsewhere = f"{subjects.inbox_prefix(subjects.agent_identity('payments'))}.x"
        watch = await admin.nc.subscribe(elsewhere)
        await triage.nc.publish(subject, encode(query), reply=elsewhere)
        assert await _dead_reason(admin, subject, 2) == f"answer subject {elsewhere!r} is not triage's inbox"
        # A good request: answered, its handler in the requester's trace, the sender the subject's.
        trace = new_traceparent()
        with use_traceparent(trace):
            reply = await request(triage.nc, subject, query, JournalReply, timeout_s=10)
        assert reply == JournalReply(verdict="continue", reason="asked by triage")
        assert journal.seen == [(query, "triage", trace)]
        assert watch.pending_msgs == 0
        await watch.unsubscribe()


async def test_the_agents_journal_request_carries_its_traceparent(admin: Bus, triage: Bus) -> None:
    agent = AgentService(AgentSettings(name="triage", instructions="Route."), triage)
    query = JournalQuery(conversation="c1", step=1, agent="triage")
    async with _Journal(admin) as journal:
        trace = new_traceparent()
        with use_traceparent(trace):
            reply = await agent._journal(query)
    assert reply.verdict == "continue"
    assert journal.seen == [(query, "triage", trace)]


async def test_the_output_desk_dead_letters_poison_outputs_and_takes_good_ones_in_their_trace(
    admin: Bus, triage: Bus
) -> None:
    taken: list[tuple[AgentOutput, str, str | None]] = []

    async def take(output: AgentOutput, subject: str) -> None:
        taken.append((output, subject, current_traceparent()))

    subject = subjects.agent_reply("triage")
    output = AgentReply(conversation="c1", step=1, agent="triage", text="hello")
    async with OutputDesk(admin.nc, admin.js, take):
        # Undecodable: dead-lettered, and the agent told "refused" (so it reports its step failed).
        answer = await request(triage.nc, subject, b"{not json", OutputTaken, timeout_s=10)
        assert answer.status == "refused" and answer.reason.startswith("decode error: ")
        assert await _dead_reason(admin, subject, 1) == answer.reason
        # Asked for outside triage's inbox: dead-lettered, never answered.
        elsewhere = subjects.agent_inbox("payments")
        watch = await admin.nc.subscribe(elsewhere)
        await triage.nc.publish(subject, encode(output), reply=elsewhere)
        assert await _dead_reason(admin, subject, 2) == f"answer subject {elsewhere!r} is not triage's inbox"
        trace = new_traceparent()
        with use_traceparent(trace):
            answer = await request(triage.nc, subject, output, OutputTaken, timeout_s=10)
        assert answer.status == "taken"
        assert taken == [(output, subject, trace)]
        assert watch.pending_msgs == 0
        await watch.unsubscribe()


async def test_a_service_on_no_one_s_subject_dead_letters_and_a_failing_answer_is_not_sent(
    admin: Bus, triage: Bus
) -> None:
    class Failing(RequestService[JournalRequest, JournalReply]):
        async def answer(self, request: JournalRequest, requester: Requester) -> JournalReply:
            raise RuntimeError("PostgreSQL is away")

    subject = subjects.agent_journal("triage")
    async with Failing(admin.nc, subjects.all_agent_journals(), msgspec.json.Decoder(JournalQuery)):
        with pytest.raises(nats.errors.TimeoutError):
            await triage.nc.request(
                subject, encode(JournalQuery(conversation="c1", step=1, agent="triage")), timeout=_NO_ANSWER_S
            )
        # Not a request at all (no answer subject): poison too.
        await triage.nc.publish(subject, encode(JournalQuery(conversation="c1", step=1, agent="triage")))
        assert await _dead_reason(admin, subject, 1) == "not a request (no answer subject)"


async def test_shutdown_returns_once_run_has_returned(admin: Bus) -> None:
    await ensure_control_bucket(admin.js)
    entered = asyncio.Event()

    async def stuck(task: AgentTask, delivery: Delivery) -> None:
        entered.set()
        await asyncio.Event().wait()  # never done: shutdown cancels it past the grace period

    consumer: Consumer[AgentTask] = Consumer(
        admin.js,
        ConsumerConfig(
            stream=subjects.WORK_STREAM,
            durable=subjects.agent_consumer("triage"),
            fetch_timeout_s=0.2,
            shutdown_grace_s=0.1,
        ),
        msgspec.json.Decoder(AgentTask),
        stuck,
    )
    desk = OutputDesk(admin.nc, admin.js, _take_nothing)
    control = ControlWatcher(admin.js)
    services = (consumer, desk, control)
    runs = [asyncio.create_task(service.run()) for service in services]
    await asyncio.gather(*(service.wait_started() for service in services))
    await admin.js.publish(
        subjects.agent_inbox("triage"), encode(AgentTask(conversation="c", step=1, agent="triage", text="hi"))
    )
    await asyncio.wait_for(entered.wait(), 10)
    for service, run in zip(services, runs, strict=True):
        await service.shutdown()
        assert run.done(), type(service).__name__
        await service.shutdown()  # idempotent
    await asyncio.gather(*runs)


async def test_shutdown_before_run_means_run_returns_at_once(admin: Bus) -> None:
    desk = OutputDesk(admin.nc, admin.js, _take_nothing)
    await desk.shutdown()
    await asyncio.wait_for(desk.run(), 5)


async def test_async_with_serves_then_stops(admin: Bus, triage: Bus) -> None:
    subject = subjects.agent_reply("triage")
    output = AgentReply(conversation="c1", step=1, agent="triage", text="hello")
    taken: list[AgentOutput] = []

    async def take(output: AgentOutput, subject: str) -> None:
        taken.append(output)

    async with OutputDesk(admin.nc, admin.js, take):
        answer = await request(triage.nc, subject, output, OutputTaken, timeout_s=10)
        assert answer.status == "taken" and len(taken) == 1
    # Stopped: it takes nothing more (the server is shared with other tests' services, so
    # whether the request finds no responder at all or one that does not answer varies).
    with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
        await triage.nc.request(subject, encode(output), timeout=_NO_ANSWER_S)
    assert len(taken) == 1
    agent = AgentService(AgentSettings(name="triage", instructions="Route."), triage)
    async with agent:
        assert agent.state.value == "running"
    assert agent.state.value == "stopped"


async def _take_nothing(output: AgentOutput, subject: str) -> None:
    return None

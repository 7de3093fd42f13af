"""The supervisor service: the only process that moves a conversation forward."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping

import msgspec

from corral.bus import (
    DECODE_ERRORS,
    AgentOutput,
    AgentTask,
    AgentWaiting,
    ApprovalDecided,
    Bus,
    ConnectionGuard,
    Consumer,
    ConsumerConfig,
    ControlWatcher,
    ConversationStart,
    CustomerMessage,
    Delivery,
    HandoffProposed,
    JournalEntry,
    KillSwitch,
    KillTarget,
    Limits,
    PoisonMessageError,
    Service,
    SupervisorInput,
    clip,
    current_traceparent,
    publish,
    serve_with_control,
    spans,
    subjects,
)
from corral.supervisor.core import _decide, _dialogue
from corral.supervisor.core._admission import Admission, admitted
from corral.supervisor.core._graph import Graph, Outgoing, annotate_decision, log_transition, worst_case
from corral.supervisor.core._idle import IdleCloser
from corral.supervisor.core._outputs import OutputDesk
from corral.supervisor.core._published import oversized, publish_outgoing
from corral.supervisor.errors import ConcurrentChange
from corral.supervisor.store._budgets import Budgets, exceeded
from corral.supervisor.store._store import ConversationRecord, ConversationSnapshot, Store

logger = logging.getLogger(__name__)

_task_decoder = msgspec.json.Decoder(AgentTask)
_MAX_CONFLICTS = 5
"""Decisions made again on a fresh snapshot before the input is left to redelivery."""


class SupervisorState(enum.Enum):
    """Lifecycle of a ``Supervisor``."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Supervisor(Service):
    """Enforce the handoff graph on every conversation until ``shutdown()``; ``async with``
    runs it in a task.

    Args:
        bus: An open bus connection with the supervisor's credentials.
        store: Conversation state.
        graph: The handoff graph and limits.
        max_in_flight: Messages handled concurrently.
        max_deliver: Deliveries before a failing message is dead-lettered.
        budgets: The conversation budgets.
        limits: How big inputs may be (``limits:``).
    """

    def __init__(
        self,
        bus: Bus,
        store: Store,
        graph: Graph,
        *,
        max_in_flight: int = 64,
        max_deliver: int = 10,
        budgets: Budgets | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__()
        self._bus = bus
        self._store = store
        self._graph = graph
        self._budgets = budgets or Budgets()
        self._limits = limits or Limits()
        self._consumer: Consumer[SupervisorInput] = Consumer(
            bus.js,
            ConsumerConfig(
                stream=subjects.WORK_STREAM,
                durable=subjects.SUPERVISOR_CONSUMER,
                max_in_flight=max_in_flight,
                max_deliver=max_deliver,
                dead_letter_body_bytes=self._limits.dead_letter_body_bytes,
            ),
            msgspec.json.Decoder(SupervisorInput),
            self.handle,
            self.input_dead,
        )
        self._desk = OutputDesk(
            bus.nc,
            bus.js,
            self.take,
            max_in_flight=max_in_flight,
            max_deliver=max_deliver,
            refused=self.output_refused,
            limits=self._limits,
        )
        self._control = ControlWatcher(bus.js, self._on_control)
        self.idle = IdleCloser(store, self.act, graph.idle_timeout_s)
        """Closes the conversations whose customer went quiet."""
        self.admission = Admission(
            store.pool,
            lambda c: self.act(c, lambda r: admitted(r, self._control.state.agents), "admitted"),
            self.republish,
            graph.max_running_per_client,
        )
        """Each client's share of running conversations; admits those that wait."""
        self.state = SupervisorState.NEW

    async def _serve(self) -> None:
        """Serve until ``shutdown()``; in-flight messages finish first."""
        self.state = SupervisorState.RUNNING
        logger.info("supervisor serving; entry agent %s", self._graph.entry)
        worst, limit = worst_case(self._limits, self._graph), self._bus.nc.max_payload
        if limit and worst > limit:
            logger.warning(
                "limits allow a task or an outcome of up to %d bytes, over the server's max_payload of"
                " %d: a conversation that grows past it is refused or escalated",
                worst,
                limit,
            )
        started = asyncio.create_task(self._started_with(self._control, self._consumer, self._desk))
        sweep = asyncio.create_task(self.idle.run(), name="corral-idle-sweep")
        admitting = asyncio.create_task(self.admission.run(), name="corral-admission")
        try:
            # The guard ends the service (and the process, non-zero) once the connection is
            # closed for good: nats-py would leave it alive and deaf.
            await serve_with_control(self._control, self._consumer, self._desk, ConnectionGuard(self._bus))
        finally:
            started.cancel()
            sweep.cancel()
            admitting.cancel()
            await asyncio.gather(started, sweep, admitting, return_exceptions=True)
            self.state = SupervisorState.STOPPED
            logger.info("supervisor stopped")

    async def shutdown(self) -> None:
        """Stop taking work; return once in-flight messages ended and ``run()`` returned;
        idempotent, and safe before ``run()``."""
        await asyncio.gather(self._consumer.shutdown(), self._desk.shutdown(), self._control.shutdown())
        await super().shutdown()

    async def handle(self, message: SupervisorInput, delivery: Delivery) -> None:
        """Act on one message from ``CORRAL_WORK``: a conversation start or an approval."""
        match message:
            case ConversationStart():
                await self._start(message, delivery.subject)
            case CustomerMessage():
                await self._customer_message(message, delivery.subject)
            case ApprovalDecided():
                await self._approval_decided(message, delivery)

    async def _start(self, message: ConversationStart, subject: str) -> None:
        """Record a new conversation and give its entry agent the first task.

        The commit comes before the publishes and the ack after them: a crash in between
        redelivers the start, which finds the conversation recorded and republishes its
        task under the same id, so nothing is lost and nothing is done twice.
        """
        client = subjects.starter(subject) or ""
        if subject != subjects.conversation_start(client, message.conversation):
            raise PoisonMessageError(
                f"conversation {message.conversation!r} started on {subject}", subject=subject
            )
        why = _decide.check_start(message, client, self._limits)
        trace = current_traceparent()
        if why is None:
            # What the start implies (its first task) must fit in a message too.
            first = _decide.start(message, None, self._graph, trace, client)
            why = self._oversized(first)
        if why is not None:
            raise PoisonMessageError(f"conversation start refused: {why}", subject=subject)

        async def decide(snapshot: ConversationSnapshot) -> _decide.Decision:
            queued = not self.admission.has_room(client)
            agents = self._control.state.agents
            return _decide.start(message, snapshot.record, self._graph, trace, client, agents, queued=queued)

        await self._decide_and_publish(message.conversation, decide, expect_new=True, event="start")

    async def _customer_message(self, message: CustomerMessage, subject: str) -> None:
        """The customer's next message (``_dialogue.customer_message``), from the client that
        started the conversation, on the subject it started it on."""
        client = subjects.starter(subject) or ""
        if subject != subjects.conversation_start(client, message.conversation):
            raise PoisonMessageError(
                f"a message for conversation {message.conversation!r} sent on {subject}", subject=subject
            )
        why = _decide.check_message(message, self._limits)
        if why is not None:
            raise PoisonMessageError(f"customer message refused: {why}", subject=subject)

        async def decide(snapshot: ConversationSnapshot) -> _decide.Decision:
            record = snapshot.record
            if record is None or record.client != client:
                # Another client's conversation is as unknown to this one as a missing one.
                raise PoisonMessageError(f"unknown conversation {message.conversation!r}", subject=subject)
            awaiting = record.status == "awaiting_customer"
            over = (
                await exceeded(snapshot.db, self._budgets, record.id, record.current_agent)
                if awaiting
                else None
            )
            decision = _dialogue.customer_message(
                record,
                message,
                max_steps=self._graph.max_steps,
                killed_agents=self._control.state.agents,
                budget_exceeded=over,
            )
            too_big = self._oversized(decision)
            if too_big is not None:
                return _dialogue.refused(record, message, too_big)
            return decision

        await self._decide_and_publish(message.conversation, decide, event="message")

    async def take(self, message: AgentOutput, subject: str) -> None:
        """Decide on the output of an agent's step, commit the decision, then publish what
        it implies.

        The commit comes before the publishes, and the agent lets go of its task only after
        both: an output that arrives again (the answer was lost) finds the decision made and
        republishes its messages under the same ids, so nothing is lost and nothing is done
        twice.

        Raises:
            PoisonMessageError: it concerns no known conversation.
        """
        sender = subjects.sender(subject) or ""
        if await self._dropped(message, sender):
            return
        why = _decide.check_output(message, self._limits)
        if why is None and isinstance(message, AgentWaiting):
            if not await self._store.approval_exists(message.approval_id, message.conversation, sender):
                why = (
                    f"approval {message.approval_id!r} was never requested for {sender} in "
                    f"conversation {message.conversation}"
                )
        if why is not None:
            raise PoisonMessageError(why, subject=subject)

        async def decide(snapshot: ConversationSnapshot) -> _decide.Decision:
            if snapshot.record is None:
                raise PoisonMessageError(f"unknown conversation {message.conversation!r}", subject=subject)
            decision = _decide.from_agent(
                message,
                sender,
                snapshot.record,
                self._graph,
                subjects.handoff_target(subject),
                self._control.state.agents,
                # Budgets are checked before a step is dispatched (and before every further
                # model and tool call, by the journal and the gateway).
                await exceeded(snapshot.db, self._budgets, message.conversation, message.target)
                if isinstance(message, HandoffProposed)
                else None,
            )
            too_big = self._oversized(decision)
            if too_big is not None:
                return _decide.too_big(snapshot.record, sender, too_big)
            return decision

        event = str(message.__struct_config__.tag)
        await self._decide_and_publish(message.conversation, decide, event=event, agent=sender)
        if isinstance(message, AgentWaiting):
            await self._decided_before_waiting(message.approval_id)

    async def _decided_before_waiting(self, approval_id: str) -> None:
        """An operator may decide an approval before the step's wait for it is recorded: its
        ``ApprovalDecided`` then found nothing waiting. Resume now (a no-op if the
        conversation is not waiting on it, so a repeat changes nothing)."""
        found = await self._store.waiting_for_approval(approval_id)
        if found is None or found[1] not in ("approved", "denied"):
            return
        conversation, status = found
        await self.act(
            conversation, lambda r: _decide.approval_decided(r, approval_id, status), "approval.decided"
        )

    async def output_refused(self, message: AgentOutput, subject: str, reason: str) -> None:
        """An output was refused for good (and dead-lettered): end its conversation with the
        reason, if it is the current step's (see ``_decide.output_refused``)."""
        sender = subjects.sender(subject) or ""
        if not subjects.is_id(message.conversation):
            return
        await self.act(
            message.conversation,
            lambda record: _decide.output_refused(
                record, sender, message.step, message.resume, clip(reason, self._limits.reason_bytes)
            ),
            "refused",
        )

    async def input_dead(self, message: SupervisorInput, delivery: Delivery, reason: str) -> None:
        """An input from ``CORRAL_WORK`` was dead-lettered: tell the client of a start or a
        message that was refused why, or escalate a conversation that was taken but cannot
        go on. (An approval decision stays in the database; the dead letter says why.)"""
        reason = clip(reason, self._limits.reason_bytes)
        client = subjects.starter(delivery.subject)
        conversation = delivery.subject.rsplit(".", 1)[-1]
        if client is None or isinstance(message, ApprovalDecided):
            return
        if isinstance(message, CustomerMessage):
            refused = _dialogue.refusal(client, message, reason)
            await publish(self._bus.js, refused.subject, refused.message, msg_id=refused.msg_id)
            return
        record = await self._store.get(conversation) if subjects.is_id(conversation) else None
        if record is not None and record.client == client:
            # Taken once, and now it cannot go on (its task cannot be published, say).
            await self.act(conversation, lambda r: _decide.input_dead(r, reason), "dead")
            return
        # Never recorded (or recorded for another client, which must not be touched).
        refusal = _decide.refused_start(client, conversation, reason)
        await publish(self._bus.js, refusal.subject, refusal.message, msg_id=refusal.msg_id)

    def _oversized(self, decision: _decide.Decision) -> str | None:
        """Why a message the decision implies could not be sent (None: all fit)."""
        return oversized(decision, self._graph.window_turns, self._bus.nc.max_payload)

    async def republish(self, conversation: str) -> None:
        """Publish again what the conversation's last decision implies (the same ids, so
        JetStream drops what it has already): for a step redelivered to its agent after
        the supervisor decided on its output, in case the publishes after that decision
        were lost."""
        async with self._store.snapshot(conversation, fresh=True) as snapshot:
            record = snapshot.record
        if record is not None:
            await self._publish(_decide.outputs(record, self._graph.window_turns), record)

    async def _decide_and_publish(
        self,
        conversation: str,
        decide: Callable[[ConversationSnapshot], Awaitable[_decide.Decision]],
        response: tuple[JournalEntry, str] | None = None,
        *,
        expect_new: bool = False,
        event: str,
        agent: str = "",
    ) -> None:
        with spans.decision(conversation, event, agent=agent) as span:
            decision, record = await self._transition(conversation, decide, response, expect_new=expect_new)
            annotate_decision(span, decision)
            if decision.record is None and decision.steps:
                for step in decision.steps:
                    logger.warning("rejected %s: %s", conversation, step.detail)
                return
            if record is None:
                return
            await self._publish([*decision.extra, *_decide.outputs(record, self._graph.window_turns)], record)
        if decision.record is not None:
            log_transition(decision.record)

    async def _transition(
        self,
        conversation: str,
        decide: Callable[[ConversationSnapshot], Awaitable[_decide.Decision]],
        response: tuple[JournalEntry, str] | None = None,
        *,
        expect_new: bool = False,
    ) -> tuple[_decide.Decision, ConversationRecord | None]:
        """Decide on a snapshot of ``conversation`` and save the decision; decide again on a
        fresh snapshot if another decision saved the conversation in between.

        ``response`` (the model response that ended the step, and its sender) is journaled
        in the same transaction as a decision that moves the conversation on.

        Returns the decision and the conversation after it (None: there is none).
        """
        for attempt in range(1, _MAX_CONFLICTS + 1):
            try:
                # First from memory (a start as new); after a conflict, as PostgreSQL has it.
                async with self._store.snapshot(
                    conversation, fresh=attempt > 1, expect_new=expect_new and attempt == 1
                ) as snapshot:
                    before = snapshot.record.status if snapshot.record is not None else None
                    decision = await decide(snapshot)
                    if decision.record is not None:
                        await snapshot.save(decision.record, decision.steps, response)
                        self.admission.saw(before, decision.record)
                    elif decision.steps:
                        await snapshot.record_steps(conversation, decision.steps)
                    return decision, snapshot.record
            except ConcurrentChange:
                if attempt == _MAX_CONFLICTS:
                    raise
                logger.info("conversation %s changed while deciding; deciding again", conversation)
        raise AssertionError("unreachable")

    async def _approval_decided(self, message: ApprovalDecided, delivery: Delivery) -> None:
        """Resume the conversation waiting on a decided approval. Only operators can publish
        here, and even then the decision is read from the database, never from the message."""
        if delivery.subject != subjects.approval_decisions():
            raise PoisonMessageError(f"approval decision on {delivery.subject}", subject=delivery.subject)
        found = await self._store.waiting_for_approval(message.approval_id)
        if found is None:
            raise PoisonMessageError(f"unknown approval {message.approval_id!r}", subject=delivery.subject)
        conversation, status = found
        await self.act(
            conversation,
            lambda r: _decide.approval_decided(r, message.approval_id, status),
            "approval.decided",
        )

    async def dead_step(self, subject: str, data: bytes, reason: str) -> None:
        """A step JetStream gave up on: escalate its conversation instead of leaving it hanging."""
        if subjects.sender(subject) is not None or not subject.endswith(".inbox"):
            return
        try:
            task = _task_decoder.decode(data)
        except DECODE_ERRORS:
            return
        await self.act(
            task.conversation,
            lambda record: _decide.step_dead(record, task.step, task.agent, reason),
        )

    async def _dropped(self, message: AgentOutput, sender: str) -> bool:
        """Record and drop what a killed agent sends or what concerns a killed conversation."""
        state = self._control.state
        switch = state.conversation_killed(message.conversation)
        why = f"conversation is killed ({switch.reason})" if switch else None
        if why is None and (switch := state.agent_killed(sender)) is not None:
            why = f"agent {sender} is killed ({switch.reason})"
        if why is None:
            return False
        await self._store.record_dropped(
            message.conversation, sender, message.step, type(message).__name__, why
        )
        logger.warning("dropped a message of %s from %s: %s", message.conversation, sender, why)
        return True

    async def _on_control(self, target: KillTarget, name: str, switch: KillSwitch | None) -> None:
        """Act on a kill switch: escalate what waits on a killed agent, end a killed conversation."""
        if switch is None:
            return
        if target == "conversation":
            await self.act(name, lambda record: _decide.conversation_killed(record, switch), "kill")
            return
        for conversation in await self._store.waiting_on(name):
            await self.act(conversation, lambda record: _decide.agent_killed(record, name, switch), "kill")
        # Tasks already queued for the killed agent must not run when it comes back.
        with contextlib.suppress(Exception):
            await self._bus.js.purge_stream(subjects.WORK_STREAM, subject=subjects.agent_inbox(name))

    async def act(
        self,
        conversation: str,
        decide: Callable[[ConversationRecord], _decide.Decision],
        event: str = "operator",
    ) -> _decide.Decision:
        """Decide on ``conversation`` as it is now, save, publish; the decision (it saved
        nothing if its ``record`` is None, or if there is no such conversation)."""

        async def on_snapshot(snapshot: ConversationSnapshot) -> _decide.Decision:
            return decide(snapshot.record) if snapshot.record is not None else _decide.Decision(record=None)

        with spans.decision(conversation, event) as span:
            decision, _ = await self._transition(conversation, on_snapshot)
            annotate_decision(span, decision)
            if decision.record is not None:
                outputs = _decide.outputs(decision.record, self._graph.window_turns)
                await self._publish([*decision.extra, *outputs], decision.record)
        if decision.record is not None:
            log_transition(decision.record)
        return decision

    @property
    def killed_agents(self) -> Mapping[str, KillSwitch]:
        """The agents killed now, by name."""
        return self._control.state.agents

    async def _publish(self, messages: list[Outgoing], record: ConversationRecord) -> None:
        # Under the decision's span when there is one; a republish carries the recorded one.
        await publish_outgoing(self._bus, messages, current_traceparent() or record.traceparent)

"""The agent service: consume the inbox, ask the model, propose a handoff or reply."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, TypeVar

import msgspec

from corral.agents._decision import (
    HandoffDecision,
    ReplyDecision,
    ToolDecision,
    parse_decision,
    response_format,
)
from corral.agents._prompts import bounded, encode_arguments, tool_message, user_prompt
from corral.agents.errors import AgentError, DecisionError
from corral.bus import (
    ATTEMPT,
    MSG_ID,
    AgentFailed,
    AgentInput,
    AgentOutput,
    AgentReply,
    AgentTask,
    AgentWaiting,
    Bus,
    BusError,
    ConnectionGuard,
    Consumer,
    ConsumerConfig,
    Delivery,
    HandoffProposed,
    JournalEntry,
    JournalQuery,
    JournalReply,
    Limits,
    Message,
    OutputTaken,
    PayloadTooLargeError,
    PoisonMessageError,
    Service,
    StepEvent,
    ToolCall,
    ToolResult,
    clip,
    encode,
    limit_problem,
    output_problem,
    publish_live,
    request,
    serve_together,
    subjects,
)
from corral.router import ChatMessage, Completion, CompletionRequest, Model, RouterError

_HANDOVER_PAUSE_S = 0.05
_HANDOVER_MAX_PAUSE_S = 2.0
_Reply = TypeVar("_Reply", JournalReply, ToolResult)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """One agent's role, as configured.

    Attributes:
        name: The agent's name; also its subject token and NATS identity.
        instructions: The system prompt.
        handoff_targets: Agents this one may hand off to (the graph's edges from it).
    """

    name: str
    instructions: str
    handoff_targets: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Tools the model may call: ``name``, ``description``, ``schema`` (JSON Schema)."""
    max_tool_calls: int = 8
    """Tool calls allowed in one step before the step fails."""
    tool_timeout_s: float = 30.0
    heartbeat_s: float = 10.0
    """How often a long step tells JetStream it is still working (a third of ack_wait)."""
    max_in_flight: int = 32
    max_deliver: int = 10
    limits: Limits = field(default_factory=Limits)
    """How big a step's outputs, tool arguments and journaled responses may be."""


class AgentState(enum.Enum):
    """Lifecycle of an ``AgentService``."""

    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class AgentService(Service):
    """Serve one agent's inbox until ``shutdown()``; ``async with`` runs it in a task.

    Args:
        settings: The agent's role.
        bus: An open bus connection with this agent's credentials.
        model: Where the agent's model calls go.
    """

    def __init__(self, settings: AgentSettings, bus: Bus, model: Model) -> None:
        super().__init__()
        self._settings = settings
        self._bus = bus
        self._model = model
        self._consumer: Consumer[AgentTask] = Consumer(
            bus.js,
            ConsumerConfig(
                stream=subjects.WORK_STREAM,
                durable=subjects.agent_consumer(settings.name),
                max_in_flight=settings.max_in_flight,
                max_deliver=settings.max_deliver,
                retry_delay_s=1.0,
                dead_letter_subject=lambda _: subjects.agent_dead_letter(settings.name),
                dead_letter_body_bytes=settings.limits.dead_letter_body_bytes,
            ),
            msgspec.json.Decoder(AgentInput),
            self.handle,
            self.task_dead,
        )
        self._system_prompt = (
            f"You are the {settings.name} agent of a customer support team.\n"
            f"{settings.instructions.strip()}\n\n{response_format(settings.handoff_targets, settings.tools)}"
        )
        self.state = AgentState.NEW

    async def _serve(self) -> None:
        """Serve the inbox; returns once ``shutdown()`` was called and in-flight steps ended."""
        self.state = AgentState.RUNNING
        logger.info("agent %s serving %s", self._settings.name, subjects.agent_inbox(self._settings.name))
        started = asyncio.create_task(self._started_with(self._consumer))
        try:
            # The guard ends the service (and the process, non-zero) once the connection is
            # closed for good: nats-py would leave it alive and deaf.
            await serve_together(self._consumer, ConnectionGuard(self._bus))
        finally:
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
            self.state = AgentState.STOPPED
            logger.info("agent %s stopped", self._settings.name)

    async def shutdown(self) -> None:
        """Stop taking work; return once in-flight steps ended and ``run()`` returned;
        idempotent, and safe before ``run()``."""
        await self._consumer.shutdown()
        await super().shutdown()

    async def handle(self, task: AgentTask, delivery: Delivery) -> None:
        """Run one step: model and tool calls, then hand the output to the supervisor; the
        task is acknowledged once the supervisor has taken it.

        A step the model cannot complete is reported as ``AgentFailed`` so the supervisor
        escalates the conversation, instead of being retried forever.
        """
        name = self._settings.name
        if task.agent != name:
            raise AgentError(f"task for {task.agent!r} arrived in {name}'s inbox", agent=name)
        # The task is held (in-progress acks) until its output is taken, however long the
        # model, the tools or a supervisor restart take.
        async with delivery.kept_alive(self._settings.heartbeat_s):
            await self._step(task, delivery.attempt)

    async def task_dead(self, task: AgentTask, delivery: Delivery, reason: str) -> None:
        """A task this agent's consumer dead-lettered (its step failed in a way that cannot
        change, or kept failing): report the step as failed, with the reason, so that the
        supervisor ends the conversation instead of leaving it running."""
        if task.agent != self._settings.name:
            return  # not this agent's step to report
        await self._publish_failure(task, f"step dead-lettered: {reason}")

    async def _step(self, task: AgentTask, attempt: int) -> None:
        name = self._settings.name
        try:
            step = await self._decide(task, attempt)
        except (RouterError, AgentError) as exc:
            if exc.retryable and attempt < self._settings.max_deliver:
                raise
            await self._publish_failure(
                task, str(exc), exc.response if isinstance(exc, DecisionError) else None
            )
            return
        except PayloadTooLargeError as exc:
            await self._publish_failure(task, str(exc))
            return
        if step is None:
            return  # the step was over already (a late redelivery): nothing to tell
        completion, decision, response = step
        common = _StepFields(conversation=task.conversation, step=task.step, resume=task.resume, agent=name)
        output: AgentOutput
        match decision:
            case HandoffDecision(target=target, confidence=confidence, reason=reason):
                # The broker lets this agent publish handoffs only toward the targets the
                # graph allows; a model that asks for another target is reported on the
                # error subject, where the supervisor refuses it and tells the client.
                allowed = target in self._settings.handoff_targets
                subject = subjects.agent_handoff(name, target) if allowed else subjects.agent_error(name)
                output = HandoffProposed(
                    **common, target=target, confidence=confidence, reason=reason, response=response
                )
                detail = f"handoff -> {target} ({confidence:.2f})"
            case _Waiting(result=result):
                # The step cannot go on without a human: the conversation waits durably in
                # the supervisor, which re-dispatches this step once the approval is decided.
                subject = subjects.agent_waiting(name)
                output = AgentWaiting(
                    **common, approval_id=result.approval_id or "", tool=result.tool, reason=result.reason
                )
                detail = f"waiting for approval {result.approval_id} of {result.tool}"
            case ReplyDecision(text=text, confidence=confidence):
                subject = subjects.agent_reply(name)
                output = AgentReply(**common, text=text, confidence=confidence, response=response)
                detail = f"reply ({confidence:.2f})"
        await self._hand_over(subject, output, task)
        await self._emit_event(task, detail, completion.model)
        logger.debug("agent %s step %s/%d: %s", name, task.conversation, task.step, detail)

    async def _decide(
        self, task: AgentTask, attempt: int
    ) -> tuple[Completion, HandoffDecision | ReplyDecision | _Waiting, JournalEntry | None] | None:
        """Ask the model, running the tools it asks for through the gateway, until it hands
        off or replies, or a tool call needs an approval.

        No model response is acted on before it is journaled: a response that calls a tool
        travels with the call and the gateway journals it with the call's effect; the one
        that ends the step is returned, to travel with the step's output, which the
        supervisor journals with its decision. A redelivered or resumed step replays the
        journal instead of asking the model again, so a crash anywhere in the step costs no
        second call for a journaled response and (with the gateway's ledger) no second
        effect. Returns None when the journal says the step is over already.
        """
        name = self._settings.name
        replay: dict[int, JournalEntry] = {}
        if attempt > 1 or task.resume > 0:
            answer = await self._journal(
                JournalQuery(conversation=task.conversation, step=task.step, agent=name)
            )
            if answer.verdict == "over":
                logger.info("agent %s step %s/%d: %s", name, task.conversation, task.step, answer.reason)
                return None
            if answer.verdict == "stop":
                raise AgentError(f"stopped: {answer.reason}", agent=name)
            replay = {entry.index: entry for entry in answer.entries}
        messages = [
            ChatMessage(role="system", content=self._system_prompt),
            ChatMessage(role="user", content=user_prompt(task)),
        ]
        for index in range(self._settings.max_tool_calls + 1):
            response = replay.get(index)
            fresh = response is None
            if response is None:
                completion = await self._model.complete(
                    CompletionRequest(agent=name, conversation=task.conversation, messages=messages)
                )
                if "\x00" in completion.text:
                    # PostgreSQL stores no NUL in text: the model's text is journaled, and
                    # acted on, with U+FFFD in its place.
                    completion = replace(completion, text=completion.text.replace("\x00", "\ufffd"))
                response = JournalEntry(
                    conversation=task.conversation,
                    step=task.step,
                    index=index,
                    agent=name,
                    text=completion.text,
                    model=completion.model,
                    input_tokens=completion.input_tokens,
                    output_tokens=completion.output_tokens,
                    cost_usd=completion.cost_usd,
                )
            else:
                completion = Completion(
                    text=response.text,
                    model=response.model,
                    input_tokens=response.input_tokens,
                    output_tokens=response.output_tokens,
                    cost_usd=response.cost_usd,
                )
            unjournaled = response if fresh else None
            try:
                decision = parse_decision(completion.text, agent=name)
            except DecisionError as exc:
                exc.response = unjournaled
                raise
            if not isinstance(decision, ToolDecision):
                return completion, decision, unjournaled
            if index == self._settings.max_tool_calls:
                break
            result = await self._call_tool(task, index, decision, unjournaled)
            if result.status == "approval_required":
                return completion, _Waiting(result=result), None
            if result.status == "stopped":
                raise AgentError(f"stopped: {result.reason}", agent=name)
            messages += [
                ChatMessage(role="assistant", content=completion.text),
                ChatMessage(role="user", content=tool_message(result)),
            ]
        raise AgentError(f"more than {self._settings.max_tool_calls} tool calls in one step", agent=name)

    async def _journal(self, query: JournalQuery) -> JournalReply:
        # Nothing is used before it is journaled: a step the journal does not answer is
        # redelivered and retried.
        return await self._ask(subjects.agent_journal(self._settings.name), query, JournalReply, "journal")

    async def _ask(self, subject: str, message: Message, reply_type: type[_Reply], what: str) -> _Reply:
        """Ask the supervisor's ``what`` (the journal, the tool gateway) and return its answer.

        Raises:
            AgentError: no answer (``retryable`` unless it can never come: too big to send,
                the connection closed), or an answer that does not decode (not retryable).
        """
        name = self._settings.name
        try:
            return await request(
                self._bus.nc, subject, message, reply_type, timeout_s=self._settings.tool_timeout_s
            )
        except PoisonMessageError as exc:
            raise AgentError(f"{what} answered nonsense: {exc}", agent=name) from exc
        except BusError as exc:
            raise AgentError(f"{what} did not answer: {exc}", agent=name, retryable=exc.retryable) from exc

    async def _call_tool(
        self, task: AgentTask, index: int, decision: ToolDecision, response: JournalEntry | None
    ) -> ToolResult:
        name, limits = self._settings.name, self._settings.limits
        arguments = encode_arguments(decision.arguments)
        why = limit_problem(
            f"arguments of {decision.tool}", arguments, limits.tool_arguments_bytes, "tool_arguments_bytes"
        )
        if why is not None:
            failed = DecisionError(f"tool call refused: {why}", agent=name)
            failed.response = response
            raise failed
        call = ToolCall(
            conversation=task.conversation,
            step=task.step,
            index=index,
            agent=name,
            tool=decision.tool,
            arguments=decision.arguments,
            response=bounded(response, limits),
        )
        # The same call is retried on redelivery; its idempotency key makes that safe. A call
        # too big to send never will be.
        return await self._ask(
            subjects.agent_tool(name), call, ToolResult, f"tool gateway on {decision.tool}"
        )

    async def _publish_failure(
        self, task: AgentTask, reason: str, response: JournalEntry | None = None
    ) -> None:
        logger.warning(
            "agent %s cannot complete %s/%d: %s",
            self._settings.name,
            task.conversation,
            task.step,
            reason,
        )
        await self._hand_over(
            subjects.agent_error(self._settings.name),
            self._failure(task, reason, response),
            task,
        )

    def _failure(self, task: AgentTask, reason: str, response: JournalEntry | None) -> AgentFailed:
        """The step's failure, with a reason that fits its limit."""
        limit = self._settings.limits.reason_bytes
        return AgentFailed(
            conversation=task.conversation,
            step=task.step,
            resume=task.resume,
            agent=self._settings.name,
            reason=clip(reason.replace("\x00", "\ufffd"), limit),
            response=response,
        )

    async def _hand_over(self, subject: str, output: AgentOutput, task: AgentTask) -> None:
        """Hand the step's output to the supervisor; return once it is taken (committed,
        and what it implies published), so the task is acknowledged only after. Sent again,
        with the same id, while the supervisor is away or asks for it again.

        An output that cannot be taken (over a limit, too big to send, or refused by the
        supervisor, which dead-lettered it with the reason) is replaced once by the step's
        failure, with the reason, so the conversation ends with it; it is never sent
        again and again. A failure that is refused too is given up on (and logged)."""
        name, limits = self._settings.name, self._settings.limits
        if not isinstance(output, AgentWaiting) and output.response is not None:
            output = msgspec.structs.replace(output, response=bounded(output.response, limits))
        why = output_problem(output, limits)
        if why is not None and not isinstance(output, AgentFailed):
            await self._give_up(task, output, why)
            return
        data = encode(output)  # once: the same bytes are sent again
        attempt, pause_s = 1, _HANDOVER_PAUSE_S
        while True:
            headers = {MSG_ID: _output_id(task), ATTEMPT: str(attempt)}
            try:
                answer = await request(
                    self._bus.nc,
                    subject,
                    data,
                    OutputTaken,
                    timeout_s=self._settings.tool_timeout_s,
                    headers=headers,
                )
            except PayloadTooLargeError as exc:
                await self._give_up(task, output, str(exc))
                return
            except Exception as exc:
                # The supervisor is restarting, or the connection is: the task stays held.
                logger.warning(
                    "agent %s: supervisor did not take %s (%s); sending it again", name, subject, exc
                )
            else:
                if answer.status == "taken":
                    return
                if answer.status == "refused":
                    logger.error("agent %s: the supervisor refused %s: %s", name, subject, answer.reason)
                    await self._give_up(task, output, f"the supervisor refused it: {answer.reason}")
                    return
                attempt += 1
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, _HANDOVER_MAX_PAUSE_S)

    async def _give_up(self, task: AgentTask, output: AgentOutput, why: str) -> None:
        """``output`` can never be taken: report the step as failed, with why, instead (once;
        a failure that cannot be taken either is only logged)."""
        name = self._settings.name
        if isinstance(output, AgentFailed):
            logger.error(
                "agent %s: gave up on the failure of %s/%d: %s", name, task.conversation, task.step, why
            )
            return
        kind = {AgentReply: "reply", HandoffProposed: "handoff", AgentWaiting: "wait"}.get(
            type(output), "output"
        )
        logger.warning(
            "agent %s: the %s of %s/%d cannot be taken: %s", name, kind, task.conversation, task.step, why
        )
        response = None if isinstance(output, AgentWaiting) else output.response
        await self._hand_over(
            subjects.agent_error(name),
            self._failure(task, f"its {kind} cannot be taken: {why}", response),
            task,
        )

    async def _emit_event(self, task: AgentTask, detail: str, model: str) -> None:
        # Events feed traces and the UI, live: a lost one must never hold up a step, and the
        # step itself is recorded by the supervisor.
        event = StepEvent(
            conversation=task.conversation,
            step=task.step,
            agent=self._settings.name,
            kind="decided",
            detail=f"{detail} via {model}",
        )
        await publish_live(self._bus.nc, subjects.agent_event(self._settings.name), event)


class _StepFields(TypedDict):
    """What every output of a step repeats from its task."""

    conversation: str
    step: int
    resume: int
    agent: str


@dataclass(frozen=True)
class _Waiting:
    """A step that stopped at a tool call needing approval."""

    result: ToolResult


def _output_id(task: AgentTask) -> str:
    resumed = f".r{task.resume}" if task.resume else ""
    return f"{task.conversation}.{task.step}.{task.agent}.out{resumed}"

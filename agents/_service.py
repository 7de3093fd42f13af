"""The agent service: consume the inbox, ask the model, propose a handoff or reply."""

from __future__ import annotations

import asyncio
import logging
from contextlib import nullcontext
from typing import TypeVar

import msgspec

from corral.agents._prompts import encode_arguments, tool_message, tool_turn, transcript_turns, user_prompt
from corral.agents._settings import AgentSettings, AgentState
from corral.agents._turns import (
    Reply,
    StepFields,
    ToolUse,
    Transfer,
    Waiting,
    assistant_turn,
    corrections,
    read_turn,
)
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
    ChatTurn,
    ConnectionGuard,
    Consumer,
    ConsumerConfig,
    Delivery,
    HandoffProposed,
    JournalQuery,
    JournalReply,
    Message,
    ModelAnswer,
    ModelCall,
    OutputTaken,
    PayloadTooLargeError,
    PoisonMessageError,
    Service,
    StepEvent,
    ToolCall,
    ToolResult,
    Turn,
    clip,
    encode,
    limit_problem,
    output_problem,
    publish_live,
    request,
    serve_together,
    spans,
    subjects,
)

_HANDOVER_PAUSE_S = 0.05
_HANDOVER_MAX_PAUSE_S = 2.0
_Reply = TypeVar("_Reply", JournalReply, ToolResult, ModelAnswer)

logger = logging.getLogger(__name__)


class AgentService(Service):
    """Serve one agent's inbox until ``shutdown()``; ``async with`` runs it in a task.

    Args:
        settings: The agent's role.
        bus: An open bus connection with this agent's credentials; its model calls go to
            the model gateway over it.
    """

    def __init__(self, settings: AgentSettings, bus: Bus) -> None:
        super().__init__()
        self._settings = settings
        self._bus = bus
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
            f"{settings.instructions.strip()}\n\n"
            "End your turn by calling `reply` (to answer the customer) or a `transfer_to_...` tool."
        )
        self._targets = set(settings.handoff_targets)
        self._team = set(settings.team)
        self._thresholds = {edge.target: edge.min_confidence for edge in settings.edges}
        self.state = AgentState.NEW

    @property
    def settings(self) -> AgentSettings:
        """The agent's role, as configured."""
        return self._settings

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
        step = spans.agent_step(
            task.conversation, name, step=task.step, attempt=delivery.attempt, tier=self._settings.tiers[0]
        )
        with step:
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
        except AgentError as exc:
            if exc.retryable and attempt < self._settings.max_deliver:
                raise
            await self._publish_failure(task, str(exc))
            return
        except PayloadTooLargeError as exc:
            await self._publish_failure(task, str(exc))
            return
        if step is None:
            return  # the step was over already (a late redelivery): nothing to tell
        decision, model, tools = step
        common = StepFields(conversation=task.conversation, step=task.step, resume=task.resume, agent=name)
        output: AgentOutput
        match decision:
            case Transfer(target=target, confidence=confidence, reason=reason, payload=payload):
                # The broker lets this agent publish handoffs only toward the targets the
                # graph allows; a model that asks for another target is reported on the
                # error subject, where the supervisor refuses it and tells the client.
                allowed = target in self._targets
                subject = subjects.agent_handoff(name, target) if allowed else subjects.agent_error(name)
                output = HandoffProposed(
                    **common,
                    target=target,
                    confidence=confidence,
                    reason=reason,
                    payload=payload,
                    tools=tools,
                )
                detail = f"handoff -> {target} ({confidence:.2f})"
            case Waiting(result=result):
                # The step cannot go on without a human: the conversation waits durably in
                # the supervisor, which re-dispatches this step once the approval is decided.
                subject = subjects.agent_waiting(name)
                output = AgentWaiting(
                    **common, approval_id=result.approval_id or "", tool=result.tool, reason=result.reason
                )
                detail = f"waiting for approval {result.approval_id} of {result.tool}"
            case Reply(text=text, confidence=confidence, awaiting_customer=awaiting):
                subject = subjects.agent_reply(name)
                output = AgentReply(
                    **common, text=text, confidence=confidence, awaiting_customer=awaiting, tools=tools
                )
                detail = f"{'question' if awaiting else 'reply'} ({confidence:.2f})"
        spans.annotate(confidence=getattr(output, "confidence", None), output=detail)
        with (
            spans.handoff(task.conversation, output) if isinstance(output, HandoffProposed) else nullcontext()
        ):
            await self._hand_over(subject, output, task)
        await self._emit_event(task, detail, model)
        logger.debug("agent %s step %s/%d: %s", name, task.conversation, task.step, detail)

    async def _decide(
        self, task: AgentTask, attempt: int
    ) -> tuple[Transfer | Reply | Waiting, str, list[Turn]] | None:
        """Ask the model (through the model gateway), running the tools it calls through the
        tool gateway, until it transfers or replies, or a tool call needs an approval.

        The model gateway journals every answer before the agent sees it, and the tool
        gateway records every call's effect under its idempotency key; both are keyed by
        (conversation, step, index), where ``index`` counts the step's model and tool calls
        together. A redelivered or resumed step asks the same questions in the same order,
        and each is answered from the journal or the ledger: no second model call, no
        second effect. Returns the step's end, the model that chose it, and the step's tool
        calls with their outcomes (for the transcript); None when the journal says the step
        is over already.
        """
        name, settings = self._settings.name, self._settings
        if attempt > 1 or task.resume > 0:
            journal = await self._journal(
                JournalQuery(conversation=task.conversation, step=task.step, agent=name)
            )
            if journal.verdict == "over":
                logger.info("agent %s step %s/%d: %s", name, task.conversation, task.step, journal.reason)
                return None
            if journal.verdict == "stop":
                raise AgentError(f"stopped: {journal.reason}", agent=name)
        messages = [
            ChatTurn(role="system", content=self._system_prompt),
            *transcript_turns(task),
            ChatTurn(role="user", content=user_prompt(task)),
        ]
        index, tier, corrected = 0, 0, 0
        called: list[Turn] = []
        # Delivered before, or resumed: the journal may hold answers of this step already.
        again = attempt > 1 or task.resume > 0
        while True:
            answer = await self._ask_model(task, index, settings.tiers[tier], messages, again)
            index += 1
            turn = read_turn(answer, self._targets, self._team)
            if turn.problems:
                corrected += 1
                if corrected > settings.max_corrections:
                    raise DecisionError(
                        f"the model's turn cannot be acted on after {settings.max_corrections} "
                        f"corrections: {'; '.join(turn.problems.values())}",
                        agent=name,
                    )
                messages = [*messages, assistant_turn(answer), *corrections(answer, turn.problems)]
                continue
            if turn.end is not None and not turn.tools:
                if turn.end.confidence < self._threshold(turn.end) and tier + 1 < len(settings.tiers):
                    # Asked again, as it was, on the next stronger tier; the weaker answer
                    # stays in the journal (it was paid for) but not in the history.
                    tier += 1
                    continue
                return turn.end, answer.model, called
            results: list[ChatTurn] = []
            for use in turn.tools:
                if len(called) >= settings.max_tool_calls:
                    raise AgentError(
                        f"more than {settings.max_tool_calls} tool calls in one step", agent=name
                    )
                result = await self._call_tool(task, index, use)
                index += 1
                if result.status == "approval_required":
                    return Waiting(result=result), answer.model, called
                if result.status == "stopped":
                    raise AgentError(f"stopped: {result.reason}", agent=name)
                shown = tool_message(result)
                results.append(ChatTurn(role="tool", tool_call_id=use.call_id, content=shown))
                called.append(tool_turn(name, use, shown, settings.limits))
            if turn.end is not None:
                return turn.end, answer.model, called
            messages = [*messages, assistant_turn(answer), *results]

    def _threshold(self, end: Transfer | Reply) -> float:
        if isinstance(end, Transfer):
            return self._thresholds.get(end.target, 0.0)
        return self._settings.reply_min_confidence

    async def _ask_model(
        self, task: AgentTask, index: int, tier: str, messages: list[ChatTurn], again: bool
    ) -> ModelAnswer:
        """One completion from the model gateway, as it journaled it.

        Raises:
            AgentError: the gateway said no more (not retryable: a budget, a kill switch,
                the turn is over) or the model failed (retryable as the gateway says).
        """
        name = self._settings.name
        call = ModelCall(
            conversation=task.conversation,
            step=task.step,
            index=index,
            agent=name,
            tier=tier,
            messages=messages,
            again=again,
        )
        answer = await self._ask(
            subjects.agent_model(name), call, ModelAnswer, "model gateway", self._settings.model_timeout_s
        )
        # The step's span adds up its model attempts (each has its own span in the gateway).
        spans.add_usage(
            input_tokens=answer.input_tokens, output_tokens=answer.output_tokens, cost_usd=answer.cost_usd
        )
        if answer.status == "stopped":
            raise AgentError(f"stopped: {answer.reason}", agent=name)
        if answer.status == "failed":
            raise AgentError(f"the model failed: {answer.reason}", agent=name, retryable=answer.retryable)
        return answer

    async def _journal(self, query: JournalQuery) -> JournalReply:
        # Nothing is used before it is journaled: a step the journal does not answer is
        # redelivered and retried.
        return await self._ask(subjects.agent_journal(self._settings.name), query, JournalReply, "journal")

    async def _ask(
        self,
        subject: str,
        message: Message,
        reply_type: type[_Reply],
        what: str,
        timeout_s: float | None = None,
    ) -> _Reply:
        """Ask the supervisor's ``what`` (the journal, the tool gateway) and return its answer.

        Raises:
            AgentError: no answer (``retryable`` unless it can never come: too big to send,
                the connection closed), or an answer that does not decode (not retryable).
        """
        name = self._settings.name
        try:
            return await request(
                self._bus.nc,
                subject,
                message,
                reply_type,
                timeout_s=timeout_s or self._settings.tool_timeout_s,
            )
        except PoisonMessageError as exc:
            raise AgentError(f"{what} answered nonsense: {exc}", agent=name) from exc
        except BusError as exc:
            raise AgentError(f"{what} did not answer: {exc}", agent=name, retryable=exc.retryable) from exc

    async def _call_tool(self, task: AgentTask, index: int, use: ToolUse) -> ToolResult:
        name, limits = self._settings.name, self._settings.limits
        arguments = encode_arguments(use.arguments)
        why = limit_problem(
            f"arguments of {use.tool}", arguments, limits.tool_arguments_bytes, "tool_arguments_bytes"
        )
        if why is not None:
            raise DecisionError(f"tool call refused: {why}", agent=name)
        call = ToolCall(
            conversation=task.conversation,
            step=task.step,
            index=index,
            agent=name,
            tool=use.tool,
            arguments=use.arguments,
        )
        # The same call is retried on redelivery; its idempotency key makes that safe. A call
        # too big to send never will be.
        with spans.tool_call(call, call_id=use.call_id) as span:
            result = await self._ask(
                subjects.agent_tool(name), call, ToolResult, f"tool gateway on {use.tool}"
            )
            spans.tool_result(span, result)
        return result

    async def _publish_failure(self, task: AgentTask, reason: str) -> None:
        logger.warning(
            "agent %s cannot complete %s/%d: %s",
            self._settings.name,
            task.conversation,
            task.step,
            reason,
        )
        await self._hand_over(
            subjects.agent_error(self._settings.name),
            self._failure(task, reason),
            task,
        )

    def _failure(self, task: AgentTask, reason: str) -> AgentFailed:
        """The step's failure, with a reason that fits its limit."""
        limit = self._settings.limits.reason_bytes
        return AgentFailed(
            conversation=task.conversation,
            step=task.step,
            resume=task.resume,
            agent=self._settings.name,
            reason=clip(reason.replace("\x00", "\ufffd"), limit),
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
        await self._hand_over(
            subjects.agent_error(name),
            self._failure(task, f"its {kind} cannot be taken: {why}"),
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


def _output_id(task: AgentTask) -> str:
    resumed = f".r{task.resume}" if task.resume else ""
    return f"{task.conversation}.{task.step}.{task.agent}.out{resumed}"

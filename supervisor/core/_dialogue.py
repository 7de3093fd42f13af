"""The supervisor's decisions on dialogue: replies that ask the customer something, the
customer's next message, and conversations left idle. Pure functions, as ``_decide``'s.

A conversation's transcript (``ConversationRecord.turns``) holds the customer's messages
and the replies, oldest first. An agent that asks the customer something leaves the
conversation ``awaiting_customer``; the customer's next message resumes it at that agent,
as a new step. Loop breakers and budgets count the whole conversation, every turn.
"""

from __future__ import annotations

from collections.abc import Mapping

from corral.bus import (
    AgentReply,
    AgentTask,
    ConversationAwaiting,
    CustomerMessage,
    KillSwitch,
    MessageRefused,
    Turn,
    clip,
    subjects,
)
from corral.supervisor.config._sections import HUMAN
from corral.supervisor.core import _takeover
from corral.supervisor.core._graph import Decision, Outgoing, escalate
from corral.supervisor.store._store import ConversationRecord, StepRecord

_DETAIL_BYTES = 512
"""How much of a customer's message a step's detail quotes."""


def first_turn(conversation: str, text: str) -> Turn:
    """The transcript's first turn: the message that started the conversation."""
    return Turn(role="customer", text=text, id=conversation)


def replied(record: ConversationRecord, sender: str, message: AgentReply) -> Decision:
    """``sender``'s reply passed its threshold: the conversation is resolved, or awaits the
    customer if the agent asked something."""
    turns = [*record.turns, Turn(role="agent", agent=sender, text=message.text)]
    if message.awaiting_customer:
        return Decision(
            record=record.evolve(status="awaiting_customer", reply=message.text, reason=None, turns=turns),
            steps=[
                StepRecord(
                    step=record.step,
                    agent=sender,
                    kind="asked",
                    confidence=message.confidence,
                    detail=clip(message.text, _DETAIL_BYTES),
                )
            ],
        )
    step = StepRecord(step=record.step, agent=sender, kind="replied", confidence=message.confidence)
    return Decision(record=record.evolve(status="replied", reply=message.text, turns=turns), steps=[step])


def tool_turns(sender: str, tools: list[Turn]) -> list[Turn]:
    """A step's tool calls as the transcript keeps them: ``tool`` turns of ``sender`` (the
    subject's agent, whatever the body says)."""
    return [
        Turn(role="tool", agent=sender, tool=t.tool, call_id=t.call_id, arguments=t.arguments, text=t.text)
        for t in tools
    ]


def customer_message(
    record: ConversationRecord,
    message: CustomerMessage,
    *,
    max_steps: int,
    killed_agents: Mapping[str, KillSwitch] | None = None,
    budget_exceeded: str | None = None,
) -> Decision:
    """The customer's next message: resume the conversation at the agent that asked.

    A message already in the transcript (sent again) changes nothing. One that comes while
    the conversation does not await the customer is refused, and its client told why.
    """
    if any(turn.role == "customer" and turn.id == message.id for turn in record.turns):
        return Decision(record=None)  # a repeat: what was decided is published again
    if record.status != "awaiting_customer":
        return refused(
            record,
            message,
            f"conversation {record.id} is {record.status}, not awaiting the customer's message",
        )
    agent = record.current_agent
    turns = [*record.turns, Turn(role="customer", text=message.text, id=message.id)]
    if agent == HUMAN:
        return _takeover.back_to_queue(record, turns)
    resumed = record.evolve(status="running", reply=None, reason=None, turns=turns)
    killed = (killed_agents or {}).get(agent)
    if killed is not None:
        return escalate(resumed, agent, f"agent {agent} is killed ({killed.reason}); escalated to a human")
    if budget_exceeded is not None:
        return escalate(resumed, agent, f"stopped: {budget_exceeded}; escalated to a human")
    if record.step >= max_steps:
        return escalate(resumed, agent, f"conversation reached {max_steps} steps; escalated to a human")
    step = record.step + 1
    return Decision(
        record=resumed.evolve(step=step, resume=0),
        steps=[StepRecord(step=step, agent=agent, kind="answered", detail=clip(message.text, _DETAIL_BYTES))],
    )


def refused(record: ConversationRecord, message: CustomerMessage, reason: str) -> Decision:
    """Tell the client its message was not taken (the conversation does not change)."""
    return Decision(record=None, extra=[refusal(record.client, message, reason)])


def refusal(client: str, message: CustomerMessage, reason: str) -> Outgoing:
    """What tells ``client`` its message was not taken, and why."""
    return Outgoing(
        subject=subjects.conversation_updates(client, message.conversation),
        message=MessageRefused(conversation=message.conversation, id=message.id, reason=reason),
        msg_id=f"{client}.{message.conversation}.m.{message.id}.refused",
    )


def idle(record: ConversationRecord, idle_timeout_s: float) -> Decision:
    """The customer did not answer within ``idle_timeout_s``: close the conversation."""
    if record.status != "awaiting_customer":
        return Decision(record=None)
    reason = f"closed: no message from the customer for {idle_timeout_s:g} s"
    return Decision(
        record=record.evolve(status="closed", reason=reason),
        steps=[StepRecord(step=record.step, agent=record.current_agent, kind="closed", detail=reason)],
    )


def task(record: ConversationRecord, window_turns: int) -> AgentTask:
    """The current step's task: the customer's latest message, with at most
    ``window_turns`` other turns (the latest ones: those before it, and the tool calls of
    the steps since it)."""
    turns = record.turns
    latest = next((i for i in range(len(turns) - 1, -1, -1) if turns[i].role == "customer"), None)
    text = record.text if latest is None else turns[latest].text
    before = [] if latest is None else [*turns[:latest], *turns[latest + 1 :]]
    return AgentTask(
        conversation=record.id,
        step=record.step,
        agent=record.current_agent,
        text=text,
        customer=record.customer,
        path=record.path,
        resume=record.resume,
        transcript=before[-window_turns:],
    )


def awaiting(record: ConversationRecord) -> Outgoing:
    """What tells the client an agent asked the customer something."""
    turn = len(record.turns)
    return Outgoing(
        subject=subjects.conversation_updates(record.client, record.id),
        message=ConversationAwaiting(
            conversation=record.id, agent=record.current_agent, text=record.reply or "", turn=turn
        ),
        msg_id=f"{record.id}.t{turn}.awaiting",
    )


def resumed_by_customer(record: ConversationRecord) -> bool:
    """The current step began with the customer's message, not with a handoff."""
    return len(record.turns) > 1 and record.turns[-1].role == "customer"

"""The supervisor's decisions, as pure functions of (conversation, message, graph).

Keeping them pure means the service only loads, decides, saves and publishes; and the
messages to publish are derived from the saved conversation alone, so a redelivered
input republishes exactly what was published before (same ``Nats-Msg-Id``, deduplicated).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from corral.bus import (
    AgentFailed,
    AgentOutput,
    AgentReply,
    AgentWaiting,
    ConversationEnded,
    ConversationStart,
    CustomerMessage,
    HandoffProposed,
    HandoffRefused,
    Hop,
    KillSwitch,
    Limits,
    message_problem,
    output_problem,
    start_problem,
    subjects,
)
from corral.supervisor.core import _dialogue
from corral.supervisor.core._graph import Decision as Decision
from corral.supervisor.core._graph import Graph as Graph
from corral.supervisor.core._graph import Outgoing as Outgoing
from corral.supervisor.core._graph import escalate
from corral.supervisor.core._published import outputs as outputs
from corral.supervisor.store._store import ConversationRecord, StepRecord


def start(
    message: ConversationStart,
    existing: ConversationRecord | None,
    graph: Graph,
    traceparent: str | None,
    client: str,
    killed_agents: Mapping[str, KillSwitch] | None = None,
    *,
    queued: bool = False,
) -> Decision:
    """A client started a conversation (a repeated start changes nothing); ``queued``: its
    client has its share of conversations running, so it waits its turn (``_admission``)."""
    if existing is not None:
        return Decision(record=None)
    killed = (killed_agents or {}).get(graph.entry)
    record = ConversationRecord(
        id=message.conversation,
        text=message.text,
        customer=message.customer,
        current_agent=graph.entry,
        step=1,
        path=[Hop(agent=graph.entry)],
        traceparent=traceparent,
        client=client,
        dry_run=message.dry_run,
        turns=[_dialogue.first_turn(message.conversation, message.text)],
    )
    if killed is not None:
        reason = f"entry agent {graph.entry} is killed ({killed.reason}); escalated to a human"
        return Decision(
            record=record.evolve(status="escalated", reason=reason),
            steps=[StepRecord(step=1, agent=graph.entry, kind="escalated", detail=reason)],
        )
    if queued:
        return Decision(
            record=record.evolve(status="queued"),
            steps=[
                StepRecord(step=1, agent=graph.entry, kind="queued", detail=f"client {client} at its share")
            ],
        )
    return Decision(record=record, steps=[StepRecord(step=1, agent=graph.entry, kind="started")])


def from_agent(
    message: AgentOutput,
    sender: str,
    record: ConversationRecord,
    graph: Graph,
    subject_target: str | None = None,
    killed_agents: Mapping[str, KillSwitch] | None = None,
    budget_exceeded: str | None = None,
) -> Decision:
    """An agent answered a step. ``sender`` comes from the subject, never from the body."""
    if message.agent != sender:
        return _rejected(
            record,
            message.step,
            sender,
            f"message on {sender}'s subject claims to come from {message.agent!r}",
        )
    if (
        isinstance(message, HandoffProposed)
        and subject_target is not None
        and subject_target != message.target
    ):
        return _rejected(
            record,
            message.step,
            sender,
            f"handoff subject names {subject_target!r} but body names {message.target!r}",
        )
    if record.status != "running" or (message.step, message.resume) < (record.step, record.resume):
        return Decision(record=None)  # late duplicate: republish what was decided
    if message.step > record.step or sender != record.current_agent:
        return _rejected(
            record,
            message.step,
            sender,
            f"step {message.step} is not {sender}'s turn (current: "
            f"{record.current_agent} at step {record.step})",
        )
    return _on_turn(message, sender, record, graph, subject_target, killed_agents, budget_exceeded)


def _on_turn(
    message: AgentOutput,
    sender: str,
    record: ConversationRecord,
    graph: Graph,
    subject_target: str | None,
    killed_agents: Mapping[str, KillSwitch] | None,
    budget_exceeded: str | None,
) -> Decision:
    """``sender``'s output at its own turn: what it asks for, decided. The tool calls it made
    on the way join the transcript, whatever is decided (they happened)."""
    if isinstance(message, AgentReply | HandoffProposed) and message.tools:
        record = record.evolve(turns=[*record.turns, *_dialogue.tool_turns(sender, message.tools)])
    match message:
        case HandoffProposed() if subject_target is None:
            # Sent on the error subject: the agent's credentials do not allow this edge.
            return _refuse(message, record, graph)
        case HandoffProposed():
            killed = (killed_agents or {}).get(message.target)
            if killed is not None:
                return escalate(
                    record,
                    sender,
                    f"handoff {sender} -> {message.target} not forwarded: agent {message.target} "
                    f"is killed ({killed.reason}); escalated to a human",
                    message.target,
                    message.confidence,
                )
            if budget_exceeded is not None:
                return escalate(
                    record,
                    sender,
                    f"stopped: {budget_exceeded}; escalated to a human",
                    message.target,
                    message.confidence,
                )
            return _handoff(message, record, graph, killed_agents)
        case AgentReply():
            needed = graph.threshold(sender, None)
            if message.confidence < needed:
                return _unsure(
                    record,
                    graph,
                    sender,
                    f"reply of {sender} confidence {message.confidence:.2f} is below {needed:.2f}",
                    message.confidence,
                    killed_agents,
                )
            return _dialogue.replied(record, sender, message)
        case AgentWaiting():
            reason = f"waiting for approval {message.approval_id} of {message.tool}: {message.reason}"
            return Decision(
                record=record.evolve(status="waiting", approval_id=message.approval_id, reason=reason),
                steps=[StepRecord(step=record.step, agent=sender, kind="waiting", detail=reason)],
            )
        case AgentFailed():
            reason = f"{sender} could not complete step {message.step}: {message.reason}"
            return escalate(record, sender, reason)


def _handoff(
    message: HandoffProposed,
    record: ConversationRecord,
    graph: Graph,
    killed_agents: Mapping[str, KillSwitch] | None = None,
) -> Decision:
    source, target = message.agent, message.target
    if target not in graph.edges.get(source, []):
        return _refuse(message, record, graph)
    payload = message.payload
    model = graph.payloads.get((source, target))
    if model is not None:
        try:
            payload = model.model_validate(message.payload).model_dump(mode="json")
        except ValidationError as exc:
            return _refuse(message, record, graph, f"invalid payload for {target}: {_first_errors(exc)}")
    needed = graph.threshold(source, target)
    if message.confidence < needed:
        return _unsure(
            record,
            graph,
            source,
            f"handoff {source} -> {target} confidence {message.confidence:.2f} is below {needed:.2f}",
            message.confidence,
            killed_agents,
            target,
        )
    bounces = _pingpong(record.path, target)
    if bounces >= graph.max_pingpong:
        return escalate(
            record,
            source,
            f"loop: {bounces} handoffs back and forth between {source} and {target}; escalated to a human",
            target,
            message.confidence,
        )
    if record.step >= graph.max_steps:
        return escalate(
            record,
            source,
            f"conversation reached {graph.max_steps} steps; escalated to a human",
            target,
            message.confidence,
        )
    step = record.step + 1
    return Decision(
        record=record.evolve(
            step=step,
            current_agent=target,
            path=[
                *record.path,
                Hop(agent=target, confidence=message.confidence, reason=message.reason, payload=payload),
            ],
        ),
        steps=[
            StepRecord(
                step=step,
                agent=source,
                kind="forwarded",
                target=target,
                confidence=message.confidence,
                detail=message.reason,
            )
        ],
    )


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    """A payload's validation errors, as a sentence the client can read."""
    errors = exc.errors(include_url=False)[:limit]
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in errors)


def _unsure(
    record: ConversationRecord,
    graph: Graph,
    source: str,
    why: str,
    confidence: float,
    killed_agents: Mapping[str, KillSwitch] | None,
    target: str | None = None,
) -> Decision:
    """A step still below its threshold (on the strongest tier it was asked on): hand it to
    ``graph.escalate_to`` if there is one that can take it, else to a human."""
    to = graph.escalate_to
    if to is None or to == source or to in (killed_agents or {}) or record.step >= graph.max_steps:
        return escalate(record, source, f"{why}; escalated to a human", target, confidence)
    step = record.step + 1
    reason = f"{why}; escalated to {to}"
    return Decision(
        record=record.evolve(
            step=step,
            current_agent=to,
            path=[*record.path, Hop(agent=to, confidence=confidence, reason=reason)],
        ),
        steps=[
            StepRecord(
                step=step, agent=source, kind="forwarded", target=to, confidence=confidence, detail=reason
            )
        ],
    )


def _rejected(record: ConversationRecord, step: int, sender: str, reason: str) -> Decision:
    return Decision(record=None, steps=[StepRecord(step=step, agent=sender, kind="rejected", detail=reason)])


def approval_decided(record: ConversationRecord, approval_id: str, status: str) -> Decision:
    """An approval the conversation waits on was decided: resume its step (the gateway
    applies the call if approved, refuses it with the reason if denied)."""
    if (
        record.status != "waiting"
        or record.approval_id != approval_id
        or status not in ("approved", "denied")
    ):
        return Decision(record=None)
    return Decision(
        record=record.evolve(status="running", approval_id=None, reason=None, resume=record.resume + 1),
        steps=[
            StepRecord(
                step=record.step,
                agent=record.current_agent,
                kind="resumed",
                detail=f"approval {approval_id} {status}",
            )
        ],
    )


def step_dead(record: ConversationRecord, step: int, agent: str, reason: str) -> Decision:
    """The step was dead-lettered: escalate, so the conversation is not lost in a queue."""
    if record.status != "running" or record.step != step:
        return Decision(record=None)
    return escalate(
        record, agent, f"step {step} of {agent} was dead-lettered: {reason}; escalated to a human"
    )


def agent_killed(record: ConversationRecord, agent: str, switch: KillSwitch) -> Decision:
    """``agent`` was killed while ``record`` waited on it: escalate to a human."""
    if record.status != "running" or record.current_agent != agent:
        return Decision(record=None)
    return escalate(record, agent, f"agent {agent} was killed ({switch.reason}); escalated to a human")


def conversation_killed(record: ConversationRecord, switch: KillSwitch) -> Decision:
    """An operator killed the conversation: it ends here, and no later step is recorded."""
    if record.status not in ("queued", "running", "waiting", "awaiting_customer"):
        return Decision(record=None)
    return Decision(record=record.evolve(status="killed", reason=f"killed: {switch.reason}"))


def _refuse(
    message: HandoffProposed, record: ConversationRecord, graph: Graph, why: str | None = None
) -> Decision:
    """Refuse a handoff along an edge the graph does not have, naming the edge (or for
    ``why``)."""
    source, target = message.agent, message.target
    allowed = graph.edges.get(source, [])
    reason = f"handoff {source} -> {target} refused: " + (
        why or f"not an allowed edge of the graph (allowed from {source}: {', '.join(allowed) or 'none'})"
    )
    refused = HandoffRefused(
        conversation=record.id, step=record.step, source=source, target=target, reason=reason
    )
    return Decision(
        record=record.evolve(status="refused", reason=reason),
        steps=[
            StepRecord(
                step=record.step,
                agent=source,
                kind="refused",
                target=target,
                confidence=message.confidence,
                detail=reason,
            )
        ],
        extra=[
            Outgoing(
                subject=subjects.conversation_updates(record.client, record.id),
                message=refused,
                msg_id=f"{record.id}.{record.step}.refused",
            )
        ],
    )


def _pingpong(path: list[Hop], target: str) -> int:
    """How many handoffs in a row, ending with one to ``target``, alternate between the
    same two agents (A -> B -> A -> B ... counts 3 for A B A B)."""
    agents = [hop.agent for hop in path] + [target]
    if len(agents) < 3 or agents[-1] != agents[-3]:
        return 0
    a, b = agents[-1], agents[-2]
    run = 1
    for i in range(len(agents) - 2, 0, -1):
        expected = b if (len(agents) - 1 - i) % 2 == 1 else a
        previous = a if expected == b else b
        if agents[i] != expected or agents[i - 1] != previous:
            break
        run += 1
    return run


def check_start(message: ConversationStart, client: str, limits: Limits) -> str | None:
    """Why a conversation start cannot be taken (None: it can); see ``bus.start_problem``."""
    return start_problem(message, client, limits)


def check_message(message: CustomerMessage, limits: Limits) -> str | None:
    """Why a customer's message cannot be taken (None: it can); see ``bus.message_problem``."""
    return message_problem(message, limits)


def check_output(message: AgentOutput, limits: Limits) -> str | None:
    """Why an agent's output cannot be taken (None: it can); see ``bus.output_problem``."""
    return output_problem(message, limits)


def refused_start(client: str, conversation: str, reason: str) -> Outgoing:
    """What tells a client its start was refused (it is not recorded: nothing was taken)."""
    return Outgoing(
        subject=subjects.conversation_updates(client, conversation),
        message=ConversationEnded(conversation=conversation, status="refused", reason=reason),
        # Not "<conversation>.ended": a start refused on one client's subject must never
        # be taken for the outcome of another client's conversation of the same id.
        msg_id=f"{client}.{conversation}.refused".encode("ascii", "backslashreplace").decode(),
    )


def output_refused(record: ConversationRecord, sender: str, step: int, resume: int, reason: str) -> Decision:
    """An output of the conversation's current step was refused for good: escalate, so the
    conversation is neither left running nor ended in silence. Only the step's own agent
    ends it this way, at the step and resume it is at."""
    if (
        record.status != "running"
        or sender != record.current_agent
        or (step, resume)
        != (
            record.step,
            record.resume,
        )
    ):
        return Decision(record=None)
    return escalate(
        record, sender, f"output of {sender} at step {step} refused: {reason}; escalated to a human"
    )


def input_dead(record: ConversationRecord, reason: str) -> Decision:
    """An input of the conversation was dead-lettered: escalate what was still open."""
    if record.status not in ("running", "waiting", "awaiting_customer"):
        return Decision(record=None)
    return escalate(record, record.current_agent, f"{reason}; escalated to a human")


def too_big(record: ConversationRecord, agent: str, reason: str) -> Decision:
    """What a decision implies cannot be sent (over the server's ``max_payload``):
    escalate instead, without the part that did not fit."""
    return Decision(
        record=record.evolve(status="escalated", reply=None, reason=f"{reason}; escalated to a human"),
        steps=[StepRecord(step=record.step, agent=agent, kind="escalated", detail=reason)],
    )

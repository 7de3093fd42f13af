"""The supervisor's decisions on the human queue (pure functions, as ``_decide``'s): an
operator who holds a conversation's claim answers its customer, hands it back to an agent
along an edge of ``graph.edges.human``, or closes it.

An escalated conversation is in the queue. While an operator converses with the customer,
its current agent is ``human``: the customer's answer comes back to the queue (to the
operator holding the claim), not to an agent.
"""

from __future__ import annotations

from collections.abc import Mapping

from corral.bus import Hop, KillSwitch, OperatorRequest, Turn, clip
from corral.supervisor.config._sections import HUMAN
from corral.supervisor.core._graph import Decision, Graph
from corral.supervisor.store._store import ConversationRecord, StepRecord

_DETAIL_BYTES = 512


def problem(record: ConversationRecord, request: OperatorRequest) -> str | None:
    """Why ``request`` cannot act on ``record`` (None: it can): it is in the queue, or an
    operator answered its customer, who has not answered yet (the operator who holds the
    claim may follow up, hand it back or close it meanwhile)."""
    if record.status == "escalated" or (
        record.status == "awaiting_customer" and record.current_agent == HUMAN
    ):
        return None
    return f"conversation {record.id} is {record.status}, not in the human queue"


def replied(record: ConversationRecord, request: OperatorRequest) -> Decision:
    """The operator answers the customer; the conversation awaits the customer's answer,
    which comes back to the queue."""
    turn = Turn(role="human", agent=request.by, text=request.text, id=request.id)
    return Decision(
        record=record.evolve(
            status="awaiting_customer",
            current_agent=HUMAN,
            reply=request.text,
            reason=None,
            turns=[*record.turns, turn],
        ),
        steps=[
            StepRecord(
                step=record.step,
                agent=HUMAN,
                kind="asked",
                detail=clip(f"{request.by}: {request.text}", _DETAIL_BYTES),
            )
        ],
    )


def handed_back(
    record: ConversationRecord,
    request: OperatorRequest,
    graph: Graph,
    killed_agents: Mapping[str, KillSwitch] | None = None,
) -> Decision | str:
    """The operator hands the conversation to ``request.agent`` with a note: its next step,
    along an edge the graph allows from ``human``; or why not."""
    allowed = graph.edges.get(HUMAN, [])
    agent = request.agent
    if agent not in allowed:
        return (
            f"{agent!r} is not an edge from {HUMAN} in the graph "
            f"(graph.edges.{HUMAN}: {', '.join(allowed) or 'none'})"
        )
    killed = (killed_agents or {}).get(agent)
    if killed is not None:
        return f"agent {agent} is killed ({killed.reason})"
    step = record.step + 1
    note = request.note or f"handed back by {request.by}"
    return Decision(
        record=record.evolve(
            status="running",
            current_agent=agent,
            step=step,
            resume=0,
            reason=None,
            reply=None,
            path=[*record.path, Hop(agent=agent, reason=note)],
        ),
        steps=[
            StepRecord(
                step=step,
                agent=HUMAN,
                kind="forwarded",
                target=agent,
                detail=clip(f"{request.by}: {note}", _DETAIL_BYTES),
            )
        ],
    )


def closed(record: ConversationRecord, request: OperatorRequest) -> Decision:
    """The operator closes the conversation."""
    reason = f"closed by {request.by}" + (f": {request.note}" if request.note else "")
    return Decision(
        record=record.evolve(status="closed", reason=reason),
        steps=[StepRecord(step=record.step, agent=HUMAN, kind="closed", detail=clip(reason, _DETAIL_BYTES))],
    )


def back_to_queue(record: ConversationRecord, turns: list[Turn]) -> Decision:
    """The customer answered an operator: the conversation is back in the queue, with the
    answer on its transcript, for the operator holding its claim."""
    reason = "the customer answered; awaiting an operator"
    return Decision(
        record=record.evolve(status="escalated", reason=reason, reply=None, turns=turns),
        steps=[
            StepRecord(
                step=record.step, agent=HUMAN, kind="answered", detail=clip(turns[-1].text, _DETAIL_BYTES)
            )
        ],
    )

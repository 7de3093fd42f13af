"""The supervisor's decisions as pure functions (no servers needed for these rules)."""

from __future__ import annotations

from corral.bus import AgentReply, AgentTask, ConversationEnded, HandoffProposed, HandoffRefused
from corral.supervisor.core._decide import Graph, from_agent, outputs
from corral.supervisor.store._store import ConversationRecord

GRAPH = Graph(entry="triage", edges={"triage": ["payments"], "payments": []}, min_confidence=0.6, max_steps=3)
RECORD = ConversationRecord(id="c1", text="refund", current_agent="triage", step=1)


def _handoff(**overrides: object) -> HandoffProposed:
    fields: dict[str, object] = dict(
        conversation="c1", step=1, agent="triage", target="payments", confidence=0.9
    )
    fields.update(overrides)
    return HandoffProposed(**fields)  # type: ignore[arg-type]


def test_allowed_handoff_forwards_to_the_target() -> None:
    decision = from_agent(_handoff(), "triage", RECORD, GRAPH, "payments")
    assert decision.record is not None
    assert (decision.record.current_agent, decision.record.step) == ("payments", 2)
    task = outputs(decision.record)[0].message
    assert isinstance(task, AgentTask) and task.agent == "payments" and task.step == 2


def test_body_claiming_another_identity_is_rejected_and_recorded() -> None:
    decision = from_agent(_handoff(agent="payments"), "triage", RECORD, GRAPH, "payments")
    assert decision.record is None
    assert [s.kind for s in decision.steps] == ["rejected"]
    assert "claims to come from 'payments'" in decision.steps[0].detail


def test_edge_not_in_graph_is_refused_with_the_edge_named() -> None:
    record = RECORD.evolve(current_agent="payments", step=2)
    decision = from_agent(
        _handoff(agent="payments", target="triage", step=2), "payments", record, GRAPH, "triage"
    )
    assert decision.record is not None and decision.record.status == "refused"
    refused = decision.extra[0].message
    assert isinstance(refused, HandoffRefused)
    assert refused.reason == (
        "handoff payments -> triage refused: not an allowed edge of the graph (allowed from payments: none)"
    )
    ended = outputs(decision.record)[0].message
    assert isinstance(ended, ConversationEnded) and ended.status == "refused"


def test_low_confidence_escalates() -> None:
    decision = from_agent(_handoff(confidence=0.2), "triage", RECORD, GRAPH, "payments")
    assert decision.record is not None and decision.record.status == "escalated"
    assert "0.20 is below 0.60" in (decision.record.reason or "")


def test_out_of_turn_reply_is_rejected_and_duplicate_changes_nothing() -> None:
    reply = AgentReply(conversation="c1", step=1, agent="payments", text="hi")
    rejected = from_agent(reply, "payments", RECORD, GRAPH)
    assert rejected.record is None and rejected.steps[0].kind == "rejected"
    late = AgentReply(conversation="c1", step=1, agent="triage", text="hi")
    duplicate = from_agent(late, "triage", RECORD.evolve(step=2, current_agent="payments"), GRAPH)
    assert duplicate.record is None and duplicate.steps == []


def test_step_limit_escalates() -> None:
    record = RECORD.evolve(step=3)
    decision = from_agent(_handoff(step=3), "triage", record, GRAPH, "payments")
    assert decision.record is not None and decision.record.status == "escalated"
    assert "reached 3 steps" in (decision.record.reason or "")

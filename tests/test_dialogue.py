"""Dialogue as the supervisor decides it (pure functions, no servers): a reply that asks
the customer something keeps the conversation open, the customer's next message resumes it
at the agent that asked, with the transcript, and a quiet customer's conversation closes."""

from __future__ import annotations

from corral.bus import (
    AgentReply,
    AgentTask,
    ConversationAwaiting,
    ConversationEnded,
    ConversationRecorded,
    ConversationStart,
    CustomerMessage,
    HandoffForwarded,
    HandoffProposed,
    KillSwitch,
    MessageRefused,
    Turn,
)
from corral.supervisor.core._decide import Graph, from_agent, outputs, start
from corral.supervisor.core._dialogue import customer_message, idle
from corral.supervisor.store._store import ConversationRecord

GRAPH = Graph(entry="triage", edges={"triage": ["payments"], "payments": []}, min_confidence=0.6, max_steps=6)


def _asked(text: str = "Which order?", *, turns: int = 0) -> ConversationRecord:
    """A conversation at payments (step 2), which has just asked the customer something."""
    begun = start(ConversationStart(conversation="c1", text="my blender is broken"), None, GRAPH, None, "web")
    assert begun.record is not None
    record = begun.record.evolve(current_agent="payments", step=2)
    for n in range(turns):  # earlier exchanges, for the window
        record = record.evolve(
            turns=[
                *record.turns,
                Turn(role="agent", agent="payments", text=f"question {n}"),
                Turn(role="customer", text=f"answer {n}", id=f"m-{n}"),
            ]
        )
    reply = AgentReply(
        conversation="c1", step=2, agent="payments", text=text, confidence=0.9, awaiting_customer=True
    )
    decision = from_agent(reply, "payments", record, GRAPH)
    assert decision.record is not None
    return decision.record


def _message(text: str = "It was order 1001", id: str = "m-a") -> CustomerMessage:
    return CustomerMessage(conversation="c1", text=text, id=id)


def test_a_reply_that_asks_keeps_the_conversation_open_and_tells_the_client() -> None:
    record = _asked()
    assert (record.status, record.current_agent, record.step) == ("awaiting_customer", "payments", 2)
    assert [(t.role, t.agent, t.text) for t in record.turns] == [
        ("customer", "", "my blender is broken"),
        ("agent", "payments", "Which order?"),
    ]
    (update,) = outputs(record)
    assert update.subject == "corral.out.web.c1"
    assert update.message == ConversationAwaiting(
        conversation="c1", agent="payments", text="Which order?", turn=2
    )


def test_a_reply_that_does_not_ask_resolves_the_conversation() -> None:
    record = _asked().evolve(status="running", step=3)
    reply = AgentReply(conversation="c1", step=3, agent="payments", text="Refunded.", confidence=0.9)
    decision = from_agent(reply, "payments", record, GRAPH)
    assert decision.record is not None and decision.record.status == "replied"
    assert decision.record.turns[-1] == Turn(role="agent", agent="payments", text="Refunded.")
    (ended,) = outputs(decision.record)
    assert isinstance(ended.message, ConversationEnded) and ended.message.reply == "Refunded."


def test_the_customers_answer_resumes_the_agent_that_asked_with_the_transcript() -> None:
    decision = customer_message(_asked(), _message(), max_steps=GRAPH.max_steps)
    record = decision.record
    assert record is not None
    assert (record.status, record.current_agent, record.step) == ("running", "payments", 3)
    assert [s.kind for s in decision.steps] == ["answered"]
    outs = outputs(record)
    # The next step's task, and no "forwarded" progress: no agent handed off.
    assert [type(o.message) for o in outs] == [AgentTask]
    task = outs[0].message
    assert isinstance(task, AgentTask)
    assert (task.agent, task.step, task.text) == ("payments", 3, "It was order 1001")
    assert [(t.role, t.text) for t in task.transcript] == [
        ("customer", "my blender is broken"),
        ("agent", "Which order?"),
    ]
    assert outs[0].msg_id == "c1.3.task"


def test_the_same_message_twice_is_one_turn() -> None:
    record = customer_message(_asked(), _message(), max_steps=GRAPH.max_steps).record
    assert record is not None
    again = customer_message(record, _message(), max_steps=GRAPH.max_steps)
    assert again.record is None and not again.extra and not again.steps


def test_a_message_while_the_agents_work_is_refused_and_the_client_told_why() -> None:
    running = customer_message(_asked(), _message(), max_steps=GRAPH.max_steps).record
    assert running is not None
    decision = customer_message(running, _message("hello?", id="m-b"), max_steps=GRAPH.max_steps)
    assert decision.record is None
    (refused,) = decision.extra
    assert refused.message == MessageRefused(
        conversation="c1", id="m-b", reason="conversation c1 is running, not awaiting the customer's message"
    )
    assert refused.subject == "corral.out.web.c1"


def test_a_task_carries_only_the_window_of_turns_before_the_latest_message() -> None:
    record = customer_message(_asked(turns=5), _message(), max_steps=GRAPH.max_steps).record
    assert record is not None
    assert len(record.turns) == 1 + 10 + 1 + 1  # everything stays on the record
    task = outputs(record, window_turns=3)[0].message
    assert isinstance(task, AgentTask)
    assert [t.text for t in task.transcript] == ["question 4", "answer 4", "Which order?"]


def test_budgets_kill_switches_and_the_step_limit_hold_across_turns() -> None:
    over = customer_message(_asked(), _message(), max_steps=GRAPH.max_steps, budget_exceeded="over $1")
    assert over.record is not None and over.record.status == "escalated"
    assert over.record.reason == "stopped: over $1; escalated to a human"
    killed = customer_message(
        _asked(), _message(), max_steps=GRAPH.max_steps, killed_agents={"payments": KillSwitch(reason="x")}
    )
    assert killed.record is not None and killed.record.status == "escalated"
    assert "agent payments is killed (x)" in (killed.record.reason or "")
    spent = customer_message(_asked(), _message(), max_steps=2)
    assert spent.record is not None and spent.record.status == "escalated"
    assert spent.record.reason == "conversation reached 2 steps; escalated to a human"
    # The customer's message is on the record all the same.
    assert spent.record.turns[-1].text == "It was order 1001"


def test_an_idle_conversation_closes_and_only_one_awaiting_the_customer() -> None:
    decision = idle(_asked(), 600)
    assert decision.record is not None and decision.record.status == "closed"
    assert decision.record.reason == "closed: no message from the customer for 600 s"
    (ended,) = outputs(decision.record)
    assert isinstance(ended.message, ConversationEnded) and ended.message.status == "closed"
    answered = customer_message(_asked(), _message(), max_steps=GRAPH.max_steps).record
    assert answered is not None
    assert idle(answered, 600).record is None


def test_a_handoff_still_reports_progress() -> None:
    begun = start(ConversationStart(conversation="c1", text="refund"), None, GRAPH, None, "web").record
    assert begun is not None
    handoff = HandoffProposed(conversation="c1", step=1, agent="triage", target="payments", confidence=0.9)
    record = from_agent(handoff, "triage", begun, GRAPH, "payments").record
    assert record is not None
    assert [type(o.message) for o in outputs(record)] == [AgentTask, HandoffForwarded]


def test_the_agent_reads_whether_its_model_asked_the_customer() -> None:
    from corral.agents._turns import Reply, read_turn
    from corral.bus import ChatToolCall, ModelAnswer

    def turn(arguments: str) -> object:
        answer = ModelAnswer(
            status="ok", tool_calls=[ChatToolCall(id="k", name="reply", arguments=arguments)]
        )
        return read_turn(answer, {"account_manager"})

    asked = turn('{"text": "Which order?", "confidence": 0.9, "awaiting_customer": true}')
    expected = Reply(call_id="k", text="Which order?", confidence=0.9, awaiting_customer=True)
    assert asked.end == expected  # type: ignore[attr-defined]
    resolved = turn('{"text": "Done.", "confidence": 0.9}')
    assert resolved.end == Reply(call_id="k", text="Done.", confidence=0.9)  # type: ignore[attr-defined]
    wrong = turn('{"text": "Done.", "confidence": 0.9, "awaiting_customer": "yes"}')
    assert wrong.problems == {"k": "error: awaiting_customer of reply is true or false"}  # type: ignore[attr-defined]


def test_the_agent_shows_its_model_the_transcript_as_history() -> None:
    from corral.agents._prompts import transcript_turns
    from corral.bus import ChatTurn

    task = AgentTask(
        conversation="c1",
        step=5,
        agent="payments",
        text="order 1001",
        transcript=[
            Turn(role="customer", text="broken blender", id="c1"),
            Turn(role="agent", agent="payments", text="Which order?"),
            Turn(role="human", agent="ada", text="Please give the number."),
            Turn(role="agent", agent="triage", text="Anything else?"),
        ],
    )
    assert transcript_turns(task) == [
        ChatTurn(role="user", content="broken blender"),
        ChatTurn(role="assistant", content="Which order?"),
        ChatTurn(role="assistant", content="(operator ada) Please give the number."),
        ChatTurn(role="assistant", content="(triage) Anything else?"),
    ]


def test_the_tool_calls_of_earlier_steps_reach_the_next_step_in_order() -> None:
    """triage looks the customer up and hands off: payments' task carries that call and its
    outcome (after the customer's message, which is the prompt), as triage's, whatever
    triage's body claimed; a reply's tool calls join the transcript too."""
    begun = start(ConversationStart(conversation="c1", text="refund 1001"), None, GRAPH, None, "web").record
    assert begun is not None
    looked_up = Turn(
        role="tool", agent="mallory", tool="lookup_customer", call_id="k1", arguments="{}", text="tool ok"
    )
    handoff = HandoffProposed(
        conversation="c1", step=1, agent="triage", target="payments", confidence=0.9, tools=[looked_up]
    )
    record = from_agent(handoff, "triage", begun, GRAPH, "payments").record
    assert record is not None
    task = outputs(record)[0].message
    assert isinstance(task, AgentTask) and task.text == "refund 1001"
    assert task.transcript == [
        Turn(
            role="tool", agent="triage", tool="lookup_customer", call_id="k1", arguments="{}", text="tool ok"
        )
    ]
    refunded = Turn(
        role="tool",
        agent="payments",
        tool="refund",
        call_id="k2",
        arguments='{"order_id": "1001"}',
        text="ok",
    )
    reply = AgentReply(
        conversation="c1", step=2, agent="payments", text="Done.", confidence=0.9, tools=[refunded]
    )
    replied = from_agent(reply, "payments", record, GRAPH).record
    assert replied is not None and [t.role for t in replied.turns] == ["customer", "tool", "tool", "agent"]


def test_the_agent_shows_its_model_earlier_tool_calls_as_native_history() -> None:
    from corral.agents._prompts import transcript_turns
    from corral.bus import ChatToolCall, ChatTurn

    task = AgentTask(
        conversation="c1",
        step=2,
        agent="payments",
        text="refund 1001",
        transcript=[
            Turn(
                role="tool",
                agent="triage",
                tool="lookup_order",
                call_id="k1",
                arguments='{"order_id": "1001"}',
                text="tool lookup_order -> ok",
            ),
            Turn(
                role="tool",
                agent="payments",
                tool="refund",
                call_id="k2",
                arguments="{}",
                text="tool refund -> denied",
            ),
        ],
    )
    assert transcript_turns(task) == [
        ChatTurn(
            role="assistant",
            tool_calls=[ChatToolCall(id="k1", name="lookup_order", arguments='{"order_id": "1001"}')],
        ),
        ChatTurn(role="tool", tool_call_id="k1", content="(triage) tool lookup_order -> ok"),
        ChatTurn(role="assistant", tool_calls=[ChatToolCall(id="k2", name="refund", arguments="{}")]),
        ChatTurn(role="tool", tool_call_id="k2", content="tool refund -> denied"),
    ]


def test_a_start_past_its_clients_share_waits_queued_and_starts_when_admitted() -> None:
    from corral.supervisor.core._admission import admitted

    queued = start(
        ConversationStart(conversation="c1", text="hi"), None, GRAPH, None, "web", queued=True
    ).record
    assert queued is not None and queued.status == "queued"
    # Nothing reaches an agent yet; a client waiting for the start hears it was recorded.
    assert [type(o.message) for o in outputs(queued)] == [ConversationRecorded]
    running = admitted(queued).record
    assert running is not None and running.status == "running"
    assert [type(o.message) for o in outputs(running)] == [ConversationRecorded, AgentTask]
    assert admitted(running).record is None  # admitted once
    killed = {"triage": KillSwitch(reason="bad deploy")}
    escalated = admitted(queued, killed).record
    assert escalated is not None and escalated.status == "escalated"

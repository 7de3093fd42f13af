"""Wire types: one tagged msgspec Struct per message kind, one union per subject family.

Messages evolve by adding fields with defaults, never by retyping them: JetStream keeps
old messages across deploys. Unknown fields are ignored so older readers keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from corral.bus._model_messages import Attempt, ChatToolCall, ModelAnswer, ModelCall
from corral.bus._operator_messages import ApprovalVerdict, OperatorAnswer, OperatorRequest

_INT32_MAX = 2**31 - 1

_Count = Annotated[int, msgspec.Meta(ge=0, le=_INT32_MAX)]
"""A step, an index, a resume count, tokens: what PostgreSQL stores as ``integer``; a value
outside it fails to decode (a poison message) instead of failing the save."""
_Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Usd = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """One agent on a conversation's path, with the confidence of the handoff to it."""

    agent: str
    confidence: float | None = None
    """Confidence of the handoff that brought the conversation here (None for the entry)."""
    reason: str = ""
    """Why the previous agent handed off here."""
    payload: dict[str, Any] = {}
    """The handoff's payload, as the edge declares it (validated by the supervisor)."""


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One turn of a conversation's transcript: what the customer said, or what an agent
    (or a human operator) answered."""

    role: Literal["customer", "agent", "human", "tool"]
    text: str
    """What was said; for a ``tool`` turn, the call's outcome as its model was shown it."""
    agent: str = ""
    """The agent that answered or called the tool (``agent``, ``tool``), or the operator's
    name (``human``)."""
    id: str = ""
    """A customer message's id, as its client gave it: a message sent twice is one turn."""
    tool: str = ""
    """A ``tool`` turn's tool."""
    call_id: str = ""
    """A ``tool`` turn's call, as the model named it."""
    arguments: str = ""
    """A ``tool`` turn's arguments, JSON text."""


class ConversationStart(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.start"):
    """A client starts a conversation (``corral.in.<conversation>``)."""

    v: int = 1
    conversation: str
    text: str
    customer: str = ""
    dry_run: bool = False
    """Policy-check and simulate every tool call; change nothing."""


class AgentTask(msgspec.Struct, frozen=True, kw_only=True, tag="agent.task"):
    """The supervisor gives an agent one step of a conversation (``corral.agent.<a>.inbox``)."""

    v: int = 1
    conversation: str
    step: _Count
    agent: str
    text: str
    customer: str = ""
    path: list[Hop] = []
    resume: _Count = 0
    """How often this step was resumed after an approval; outputs echo it."""
    transcript: list[Turn] = []
    """The turns before ``text`` (the customer's latest message), oldest first, at most
    ``conversation.window_turns`` of them."""


class CustomerMessage(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.message"):
    """The customer's next turn in a conversation that awaits it (``corral.in.<client>.<conversation>``,
    as the start)."""

    v: int = 1
    conversation: str
    text: str
    id: str
    """The message's id, chosen by the client: the same id twice is one turn."""


class _StepOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What every output of an agent's step says about the step it ends."""

    v: int = 1
    conversation: str
    step: _Count
    resume: _Count = 0
    agent: str
    """The identity the body claims; the supervisor trusts only the subject token."""


class _StepEnd(_StepOutput, frozen=True, kw_only=True):
    """An output that ends the step. (What the model answered is in the journal, written by
    the model gateway: an agent reports none of it.)"""


class _ToolsCalled(_StepEnd, frozen=True, kw_only=True):
    """An end the step reached after tool calls, which the transcript keeps."""

    tools: list[Turn] = []
    """The step's tool calls and their outcomes (``tool`` turns), in order, as the agent's
    model saw them: the next step, of this agent or another, is shown them. (The gateway's
    ledger and the audit chain are the record of what the calls did.)"""


class HandoffProposed(_ToolsCalled, frozen=True, kw_only=True, tag="handoff.proposed"):
    """An agent proposes handing the conversation to ``target``."""

    target: str
    confidence: _Confidence
    reason: str = ""
    payload: dict[str, Any] = {}
    """What the target needs, as the edge's payload model declares it."""


class AgentReply(_ToolsCalled, frozen=True, kw_only=True, tag="agent.reply"):
    """An agent answers the customer: the conversation is resolved, or, if the agent asked
    the customer something, it awaits the customer's next message."""

    text: str
    confidence: _Confidence = 1.0
    awaiting_customer: bool = False


class AgentFailed(_StepEnd, frozen=True, kw_only=True, tag="agent.failed"):
    """An agent could not complete its step (e.g. the model's answer made no sense)."""

    reason: str


class AgentWaiting(_StepOutput, frozen=True, kw_only=True, tag="agent.waiting"):
    """An agent's step needs a human's (or a role's) approval before it can go on."""

    approval_id: str
    tool: str
    reason: str = ""


class ApprovalDecided(msgspec.Struct, frozen=True, kw_only=True, tag="approval.decided"):
    """An operator decided an approval (``corral.control.approvals``). The supervisor reads
    the decision itself from the database; this message only says when to look."""

    v: int = 1
    approval_id: str


class StepEvent(msgspec.Struct, frozen=True, kw_only=True, tag="step.event"):
    """Something happened inside an agent's step (for traces and the UI)."""

    v: int = 1
    conversation: str
    step: _Count
    agent: str
    kind: str
    detail: str = ""


class Alert(msgspec.Struct, frozen=True, kw_only=True, tag="alert"):
    """Something an operator must look at (``corral.alerts``)."""

    v: int = 1
    kind: str
    """``max_deliveries`` (a message no one could handle), or an anomaly: ``tool_rate``,
    ``repeated_call``, ``retry_storm``, ``cost_outlier``."""
    reason: str
    subject: str = ""
    consumer: str = ""
    agent: str = ""
    """The agent it is about, if one."""
    conversation: str = ""
    """The conversation it is about, if one."""
    model: str = ""
    """The model it is about (a retry storm)."""
    at: float = 0.0
    """When it was raised (UNIX time)."""


class HandoffForwarded(msgspec.Struct, frozen=True, kw_only=True, tag="handoff.forwarded"):
    """The supervisor forwarded a handoff (``corral.out.<conversation>``)."""

    v: int = 1
    conversation: str
    step: _Count
    source: str
    target: str
    confidence: float


class ConversationRecorded(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.recorded"):
    """The supervisor recorded a start: it runs, or waits its turn (``queued``: its client
    has its share running). Live progress, for a client that answers only once the next
    request will find the conversation (the API)."""

    v: int = 1
    conversation: str
    status: Literal["running", "queued"]


class HandoffRefused(msgspec.Struct, frozen=True, kw_only=True, tag="handoff.refused"):
    """The supervisor refused a handoff; ``reason`` names the edge and why."""

    v: int = 1
    conversation: str
    step: _Count
    source: str
    target: str
    reason: str


class ToolDecided(msgspec.Struct, frozen=True, kw_only=True, tag="tool.decided"):
    """The gateway decided a tool call (the client sees it, with the policies behind it)."""

    v: int = 1
    conversation: str
    step: _Count
    agent: str
    tool: str
    status: str
    reason: str = ""
    policy_ids: list[str] = []
    approval_id: str | None = None
    result: dict[str, Any] = {}


ConversationStatus = Literal[
    "queued",
    "running",
    "waiting",
    "awaiting_customer",
    "replied",
    "refused",
    "escalated",
    "failed",
    "killed",
    "closed",
]


class ConversationWaiting(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.waiting"):
    """The conversation waits for an approval; it resumes on the decision."""

    v: int = 1
    conversation: str
    approval_id: str
    reason: str = ""


class ConversationAwaiting(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.awaiting"):
    """An agent asked the customer something; the conversation goes on with the customer's
    next message (``CustomerMessage``)."""

    v: int = 1
    conversation: str
    agent: str
    text: str
    turn: _Count
    """The turn's number in the transcript (the first message is 1)."""


class MessageRefused(msgspec.Struct, frozen=True, kw_only=True, tag="message.refused"):
    """A customer message that was not taken, and why (the conversation was not awaiting
    the customer, say)."""

    v: int = 1
    conversation: str
    id: str
    reason: str


class ConversationEnded(msgspec.Struct, frozen=True, kw_only=True, tag="conversation.ended"):
    """A conversation reached a terminal state."""

    v: int = 1
    conversation: str
    status: ConversationStatus
    path: list[Hop] = []
    reply: str | None = None
    reason: str | None = None


ToolStatus = Literal["ok", "error", "denied", "approval_required", "invalid", "simulated", "stopped"]
"""``error``: the tool ran and reported a business failure (no effect, e.g. nothing left
to refund); it is recorded like any result, so a retry does not try again.
``stopped``: a budget or a loop breaker ended the conversation; the agent stops its step."""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, tag="tool.call"):
    """An agent asks the tool gateway to apply one tool (``corral.from.<agent>.tool``).

    ``index`` numbers the calls within one step; with the conversation and the step it
    forms the idempotency key, so a repeated call is applied once.
    """

    v: int = 1
    conversation: str
    step: _Count
    index: _Count
    agent: str
    """The identity the body claims; the gateway trusts only the subject token."""
    tool: str
    arguments: dict[str, Any] = {}


class ToolResult(msgspec.Struct, frozen=True, kw_only=True, tag="tool.result"):
    """The gateway's answer: what was decided, under which policies, and the result."""

    v: int = 1
    conversation: str
    step: _Count
    index: _Count
    tool: str
    status: ToolStatus
    result: dict[str, Any] = {}
    reason: str = ""
    policy_ids: list[str] = []
    approval_id: str | None = None
    replayed: bool = False
    """True when the ledger answered: the effect happened on an earlier delivery."""


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True, tag="journal.entry"):
    """One model answer of a step, as the model gateway journaled it before the agent saw
    it: nothing an answer causes happens before it is journaled, and a journaled answer is
    never asked for again (a redelivered step replays it)."""

    v: int = 1
    conversation: str
    step: _Count
    index: _Count
    agent: str
    text: str
    model: str = ""
    input_tokens: _Count = 0
    output_tokens: _Count = 0
    cost_usd: _Usd = 0.0
    tool_calls: list[ChatToolCall] = []
    tier: str = ""
    confidence: float | None = None
    """What the answer's reply or transfer claims (None: neither)."""
    attempts: list[Attempt] = []


class JournalQuery(msgspec.Struct, frozen=True, kw_only=True, tag="journal.query"):
    """A redelivered step asks for what was journaled before (its replay)."""

    v: int = 1
    conversation: str
    step: _Count
    agent: str


class JournalReply(msgspec.Struct, frozen=True, kw_only=True, tag="journal.reply"):
    """The journal's answer: the entries of the step, and whether the step may go on
    (``stop`` when a budget or a kill switch says no, with the reason)."""

    v: int = 1
    entries: list[JournalEntry] = []
    verdict: Literal["continue", "stop", "over"] = "continue"
    """``over``: the step is no longer the asker's (it ended, or the conversation did)."""
    reason: str = ""


class OutputTaken(msgspec.Struct, frozen=True, kw_only=True, tag="output.taken"):
    """The supervisor's answer to a step's output.

    ``taken``: decided, committed and the next messages published; the agent may let go
    of its task. ``retry``: not taken this time; send it again. ``refused``: it can never
    be taken (it was dead-lettered, with ``reason``).
    """

    v: int = 1
    status: Literal["taken", "retry", "refused"]
    reason: str = ""


JournalRequest = JournalQuery
"""Everything on ``corral.from.<agent>.journal``."""


SupervisorInput = ConversationStart | CustomerMessage | ApprovalDecided
"""Everything the supervisor consumes from ``CORRAL_WORK``."""

AgentOutput = HandoffProposed | AgentReply | AgentFailed | AgentWaiting
"""Everything an agent hands the supervisor at the end of a step (request/reply on
``corral.from.<agent>.{handoff.<target>,reply,error,waiting}``)."""

AgentInput = AgentTask
"""Everything an agent consumes from its inbox."""

ClientUpdate = (
    HandoffForwarded
    | ConversationRecorded
    | HandoffRefused
    | ConversationEnded
    | ToolDecided
    | ConversationWaiting
    | ConversationAwaiting
    | MessageRefused
)
"""Everything a client may see on ``corral.out.<conversation>``."""

AgentEvent = StepEvent
"""Everything on ``corral.from.<agent>.event``."""

Message = (
    ConversationStart
    | CustomerMessage
    | ConversationAwaiting
    | MessageRefused
    | AgentTask
    | HandoffProposed
    | AgentReply
    | AgentFailed
    | AgentWaiting
    | Alert
    | ApprovalDecided
    | ConversationWaiting
    | StepEvent
    | HandoffForwarded
    | ConversationRecorded
    | HandoffRefused
    | ConversationEnded
    | ToolCall
    | ToolResult
    | ToolDecided
    | JournalEntry
    | JournalQuery
    | JournalReply
    | OutputTaken
    | ModelCall
    | ModelAnswer
    | OperatorRequest
    | ApprovalVerdict
    | OperatorAnswer
)

_encoder = msgspec.json.Encoder()


def encode(message: Message) -> bytes:
    """Encode any wire message as JSON bytes."""
    return _encoder.encode(message)

"""Every subject and stream name corral uses, built in one place.

Subject families::

    corral.in.<client>.<conversation>        client -> supervisor: start a conversation
    corral.agent.<agent>.inbox               supervisor -> agent: a task (only the supervisor publishes)
    corral.from.<agent>.handoff.<target>     agent -> supervisor: proposed handoff (request)
    corral.from.<agent>.reply                agent -> supervisor: final reply (request)
    corral.from.<agent>.error                agent -> supervisor: the agent could not do its step
    corral.from.<agent>.waiting              agent -> supervisor: the step waits for an approval
    corral.from.<agent>.tool                 agent -> tool gateway: a tool call (request)
    corral.from.<agent>.journal              agent -> supervisor: a step's replay (request)
    corral.from.<agent>.event                agent -> anyone: step events (trace, UI)
    corral.from.<agent>.dead                 agent: messages its consumer dead-lettered
    corral.out.<client>.<conversation>       supervisor -> client: progress and outcome
    corral.dlq.<original subject>            dead letters, with the decode error in a header

The first token after ``in``, ``out`` and ``from`` is an identity that NATS permissions
tie to one set of credentials, so whoever publishes there is who the subject says.
"""

from __future__ import annotations

import re

PREFIX = "corral"

WORK_STREAM = "CORRAL_WORK"
EVENTS_STREAM = "CORRAL_EVENTS"
DEAD_LETTER_STREAM = "CORRAL_DLQ"
SPANS_STREAM = "CORRAL_SPANS"
SPAN_WRITER_CONSUMER = "span-writer"

CONTROL_BUCKET = "CORRAL_CONTROL"
"""JetStream KV bucket of kill switches (``agent.<name>``, ``conversation.<id>``)."""

SUPERVISOR_CONSUMER = "supervisor"

DEFAULT_CLIENT = "client"
"""The client identity the CLI uses."""

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What every id that arrives from outside (a conversation, a client) must match: one
subject token, a JetStream KV key part and a file name on every system."""
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_token(value: str, what: str = "token") -> str:
    """Return ``value`` if it is usable as one subject token.

    Raises:
        ValueError: if it is empty or contains ``.``, ``*``, ``>`` or white space.
    """
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9_-]+ to be a subject token")
    return value


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it matches ``ID_PATTERN`` (ASCII letters, digits, ``_`` and ``-``,
    1 to 64 of them).

    Raises:
        ValueError: naming ``what`` and the pattern.
    """
    if not _ID.fullmatch(value):
        shown = value if len(value) <= 80 else f"{value[:80]}..."
        raise ValueError(f"{what} {shown!r} must match {ID_PATTERN}")
    return value


def is_id(value: str) -> bool:
    """Whether ``value`` matches ``ID_PATTERN`` (see ``check_id``)."""
    return _ID.fullmatch(value) is not None


def conversation_start(client: str, conversation: str) -> str:
    """Subject ``client`` publishes a conversation start on."""
    return f"{PREFIX}.in.{client}.{conversation}"


def client_starts(client: str) -> str:
    """Wildcard of every conversation ``client`` may start."""
    return f"{PREFIX}.in.{client}.>"


def starter(subject: str) -> str | None:
    """The client of a ``corral.in.<client>.<conversation>`` subject, else None."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[0] == PREFIX and parts[1] == "in":
        return parts[2]
    return None


def all_conversation_starts() -> str:
    """Wildcard of every conversation start."""
    return f"{PREFIX}.in.>"


def agent_inbox(agent: str) -> str:
    """An agent's inbox; only the supervisor may publish here."""
    return f"{PREFIX}.agent.{agent}.inbox"


def all_agent_inboxes() -> str:
    """Wildcard of every agent inbox."""
    return f"{PREFIX}.agent.*.inbox"


def agent_handoff(agent: str, target: str) -> str:
    """Subject on which ``agent`` proposes a handoff to ``target``."""
    return f"{PREFIX}.from.{agent}.handoff.{target}"


def agent_reply(agent: str) -> str:
    """Subject on which ``agent`` publishes a final reply."""
    return f"{PREFIX}.from.{agent}.reply"


def agent_error(agent: str) -> str:
    """Subject on which ``agent`` reports a step it could not complete."""
    return f"{PREFIX}.from.{agent}.error"


def agent_tool(agent: str) -> str:
    """Subject on which ``agent`` asks the tool gateway for a tool call (request/reply)."""
    return f"{PREFIX}.from.{agent}.tool"


def all_agent_tools() -> str:
    """Wildcard of every agent's tool requests (the gateway's subscription)."""
    return f"{PREFIX}.from.*.tool"


def agent_model(agent: str) -> str:
    """Subject on which ``agent`` asks the model gateway for a completion (request/reply)."""
    return f"{PREFIX}.from.{agent}.model"


def all_agent_models() -> str:
    """Wildcard of every agent's model requests (the model gateway's subscription)."""
    return f"{PREFIX}.from.*.model"


def agent_journal(agent: str) -> str:
    """Subject on which ``agent`` journals model responses and asks for replays."""
    return f"{PREFIX}.from.{agent}.journal"


def all_agent_journals() -> str:
    """Wildcard of every agent's journal requests (the supervisor's subscription)."""
    return f"{PREFIX}.from.*.journal"


def agent_waiting(agent: str) -> str:
    """Subject on which ``agent`` says its step waits for an approval."""
    return f"{PREFIX}.from.{agent}.waiting"


def api_requests() -> str:
    """Subject of the HTTP API's questions to the supervisor (its keys, conversations)."""
    return f"{PREFIX}.api.requests"


def operator_requests() -> str:
    """Subject of the operators' requests to the supervisor (the human queue's actions)."""
    return f"{PREFIX}.operator.requests"


def approval_decisions() -> str:
    """Subject on which operators announce approval decisions (only they may publish)."""
    return f"{PREFIX}.control.approvals"


def agent_event(agent: str) -> str:
    """Subject on which ``agent`` publishes step events."""
    return f"{PREFIX}.from.{agent}.event"


def agent_outputs() -> list[str]:
    """Wildcards of every step output the supervisor answers (requests: an agent lets go
    of its task only once the supervisor has committed the output)."""
    return [
        f"{PREFIX}.from.*.handoff.*",
        f"{PREFIX}.from.*.reply",
        f"{PREFIX}.from.*.error",
        f"{PREFIX}.from.*.waiting",
    ]


def conversation_updates(client: str, conversation: str) -> str:
    """Subject a conversation's client is told its outcome on (ended, waiting, refused);
    stored, so a client that was away can read it later."""
    return f"{PREFIX}.out.{client}.{conversation}"


def conversation_progress(client: str, conversation: str) -> str:
    """Subject a conversation's client is told its progress on (forwards, tool decisions):
    live only; every step is recorded in PostgreSQL, so storing these too would cost a
    write each."""
    return f"{PREFIX}.out.{client}.{conversation}.progress"


def client_updates(client: str) -> str:
    """Wildcard of the updates of every conversation ``client`` started."""
    return f"{PREFIX}.out.{client}.>"


def all_conversation_updates() -> str:
    """Wildcard of every conversation update, outcome or progress."""
    return f"{PREFIX}.out.>"


def all_conversation_outcomes() -> str:
    """Wildcard of every conversation's outcome subject (the stored updates)."""
    return f"{PREFIX}.out.*.*"


def alerts() -> str:
    """Subject of operator alerts (stored in ``CORRAL_EVENTS``)."""
    return f"{PREFIX}.alerts"


def spans(identity: str) -> str:
    """Where ``identity``'s process publishes its finished spans (``CORRAL_SPANS``)."""
    return f"{PREFIX}.spans.{identity}"


def all_spans() -> str:
    """Wildcard of every process's spans."""
    return f"{PREFIX}.spans.>"


def dead_letter(subject: str) -> str:
    """Dead-letter subject for a message first published on ``subject``."""
    return f"{PREFIX}.dlq.{subject}"


def all_dead_letters() -> list[str]:
    """Wildcards of every dead letter."""
    return [f"{PREFIX}.dlq.>", f"{PREFIX}.from.*.dead"]


def agent_dead_letter(agent: str) -> str:
    """Where ``agent``'s consumer dead-letters (inside the agent's own namespace)."""
    return f"{PREFIX}.from.{agent}.dead"


def inbox_prefix(identity: str) -> str:
    """Reply-inbox prefix of an identity; it may subscribe only below it."""
    return f"_INBOX.{identity}"


def agent_identity(agent: str) -> str:
    """NATS identity (and credentials file stem) of an agent."""
    return f"agent-{agent}"


def is_agent_inbox(agent: str, subject: str) -> bool:
    """Whether ``subject`` is under ``agent``'s own reply inbox: the only place an answer
    to ``agent``'s request may go (the request names its reply subject, so a hostile agent
    could otherwise have the supervisor publish wherever the supervisor may)."""
    return subject.startswith(f"{inbox_prefix(agent_identity(agent))}.")


def agent_control_key(agent: str) -> str:
    """Kill-switch key of an agent in ``CONTROL_BUCKET``."""
    return f"agent.{agent}"


def conversation_control_key(conversation: str) -> str:
    """Kill-switch key of a conversation in ``CONTROL_BUCKET``."""
    return f"conversation.{conversation}"


def agent_consumer(agent: str) -> str:
    """Durable consumer name of an agent's inbox (shared by its replicas)."""
    return f"agent-{agent}"


def sender(subject: str) -> str | None:
    """The agent a ``corral.from.<agent>.…`` subject belongs to, else None.

    The subject token is the sender's identity: NATS permissions make it unforgeable,
    unlike anything in the message body.
    """
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == PREFIX and parts[1] == "from":
        return parts[2]
    return None


def handoff_target(subject: str) -> str | None:
    """The target of a ``corral.from.<agent>.handoff.<target>`` subject, else None."""
    parts = subject.split(".")
    if len(parts) == 5 and parts[1] == "from" and parts[3] == "handoff":
        return parts[4]
    return None

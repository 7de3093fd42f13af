"""What a conversation's state implies was published: its current step's task, the news
of a handoff or of a recorded start, or its outcome for the client. The supervisor
publishes it after each decision and again, under the same ids, whenever it may have been
lost (JetStream drops what it has)."""

from __future__ import annotations

import asyncio

from corral.bus import (
    MSG_ID,
    TRACEPARENT,
    Bus,
    ConversationEnded,
    ConversationRecorded,
    ConversationWaiting,
    HandoffForwarded,
    encode,
    payload_size,
    publish,
    publish_live,
    subjects,
)
from corral.supervisor.core import _dialogue
from corral.supervisor.core._graph import Decision, Outgoing
from corral.supervisor.store._store import ConversationRecord


def outputs(record: ConversationRecord, window_turns: int = 20) -> list[Outgoing]:
    """Everything the conversation's current state implies was published (a task carries
    at most ``window_turns`` earlier turns of the transcript)."""
    updates = subjects.conversation_updates(record.client, record.id)
    recorded = _recorded(record)
    if record.status == "queued":
        return recorded  # no task until it is admitted
    if record.status == "running":
        out = [
            *recorded,
            Outgoing(
                subject=subjects.agent_inbox(record.current_agent),
                message=_dialogue.task(record, window_turns),
                # A resumed step is a new delivery, not a duplicate of the first.
                msg_id=f"{record.id}.{record.step}.task" + (f".r{record.resume}" if record.resume else ""),
            ),
        ]
        if len(record.path) > 1 and not _dialogue.resumed_by_customer(record):
            last, before = record.path[-1], record.path[-2]
            out.append(
                Outgoing(
                    subject=subjects.conversation_progress(record.client, record.id),
                    message=HandoffForwarded(
                        conversation=record.id,
                        step=record.step,
                        source=before.agent,
                        target=last.agent,
                        confidence=last.confidence or 0.0,
                    ),
                    msg_id=f"{record.id}.{record.step}.forwarded",
                    stored=False,
                )
            )
        return out
    if record.status == "awaiting_customer":
        return [_dialogue.awaiting(record)]
    if record.status == "waiting":
        return [
            Outgoing(
                subject=updates,
                message=ConversationWaiting(
                    conversation=record.id, approval_id=record.approval_id or "", reason=record.reason or ""
                ),
                msg_id=f"{record.id}.{record.step}.waiting.{record.resume}",
            )
        ]
    return [
        Outgoing(
            subject=updates,
            message=ConversationEnded(
                conversation=record.id,
                status=record.status,
                path=record.path,
                reply=record.reply,
                reason=record.reason,
            ),
            # An escalation is not final (an operator may hand the conversation back): each
            # outcome is its own message, and a republished one the same.
            msg_id=f"{record.id}.ended"
            if record.status != "escalated"
            else f"{record.id}.{record.step}.t{len(record.turns)}.escalated",
        )
    ]


def _recorded(record: ConversationRecord) -> list[Outgoing]:
    """A start just recorded (running, or queued): live news for a client waiting for it."""
    if (
        record.status not in ("running", "queued")
        or record.step != 1
        or len(record.turns) != 1
        or record.resume
    ):
        return []
    return [
        Outgoing(
            subject=subjects.conversation_progress(record.client, record.id),
            message=ConversationRecorded(conversation=record.id, status=record.status),
            msg_id=f"{record.id}.recorded",
            stored=False,
        )
    ]


def oversized(decision: Decision, window_turns: int, max_payload: int) -> str | None:
    """Why a message ``decision`` implies would not fit the server's ``max_payload`` (None:
    all fit, or the server sets no limit)."""
    record = decision.record
    if record is None or not max_payload:
        return None
    for out in [*decision.extra, *outputs(record, window_turns)]:
        headers = {MSG_ID: out.msg_id}
        if record.traceparent:
            headers[TRACEPARENT] = record.traceparent
        size = payload_size(encode(out.message), headers)
        if size > max_payload:
            kind = type(out.message).__name__
            return (
                f"the {kind} it implies would be {size} bytes, over the server's max_payload ({max_payload})"
            )
    return None


async def publish_outgoing(bus: Bus, messages: list[Outgoing], traceparent: str | None) -> None:
    """Publish what a decision implies, at once: stored ones to JetStream (under their
    ids), live ones on core NATS, each carrying ``traceparent``."""
    await asyncio.gather(
        *(
            publish(bus.js, out.subject, out.message, msg_id=out.msg_id, traceparent=traceparent)
            if out.stored
            else publish_live(bus.nc, out.subject, out.message, traceparent=traceparent)
            for out in messages
        )
    )

"""The human queue's desk in the supervisor: operators' requests to claim an escalated
conversation, answer its customer, hand it back to an agent, or close it.

Operators ask on ``corral.operator.requests`` (request/reply; only the operators' identity
may publish there, and answers go only to its inbox). Every action is decided by the
supervisor like any other input (``Supervisor.act``), and is in the audit chain with the
operator's name, its outcome and the conversation's customer.

A claim is exclusive and lapses after ``queue.claim_ttl_s`` without an action: the
conversation then returns to the queue, for anyone to claim. Of two operators claiming at
once, exactly one wins: PostgreSQL decides, on the claim's row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal

import asyncpg
import msgspec
from nats.aio.client import Client

from corral.bus import (
    ApprovalVerdict,
    KillSwitch,
    OperatorAnswer,
    OperatorInput,
    OperatorRequest,
    Requester,
    RequestService,
    SwitchRequest,
    subjects,
)
from corral.supervisor.audit._audit import AuditEntry, append_audit, digest_arguments
from corral.supervisor.core import _takeover
from corral.supervisor.core._graph import Act, Decision, Graph
from corral.supervisor.core._switches import flip_switch
from corral.supervisor.core._verdicts import take_verdict
from corral.supervisor.store._store import ConversationRecord

logger = logging.getLogger(__name__)


_CLAIM = """
WITH queued AS (SELECT id FROM conversations WHERE id = $1 AND status = 'escalated')
INSERT INTO conversation_claims (conversation, claimed_by, expires_at)
SELECT id, $2, now() + make_interval(secs => $3) FROM queued
ON CONFLICT (conversation) DO UPDATE
    SET claimed_by = excluded.claimed_by, claimed_at = now(), expires_at = excluded.expires_at
    WHERE conversation_claims.expires_at <= now() OR conversation_claims.claimed_by = excluded.claimed_by
RETURNING claimed_by, extract(epoch FROM expires_at)::float8 AS expires_at
"""

_HOLDER = """
SELECT c.status, c.customer, k.claimed_by, extract(epoch FROM k.expires_at)::float8 AS expires_at,
    k.expires_at > now() AS live,
    (SELECT action FROM operator_actions WHERE id = $2) AS done
FROM conversations c LEFT JOIN conversation_claims k ON k.conversation = c.id
WHERE c.id = $1
"""


class HumanDesk(RequestService[OperatorInput, OperatorAnswer]):
    """Answer operators' requests on the human queue until ``shutdown()``.

    Args:
        nc: The supervisor's NATS connection.
        pool: PostgreSQL (the claims, the actions done, the audit chain).
        act: How a decision on a conversation is made, saved and published.
        graph: The handoff graph (``graph.edges.human``: where a conversation may go back).
        killed_agents: The agents killed now.
        operator_identities: The identities operators ask as (the operators' own, and the
            API's for its operator endpoints); answers go to their inboxes only.
        claim_ttl_s: How long a claim holds without an action.
        approvers: Who may decide for each ``@approver`` role (``tools.approvers``).
        agents: The team's agents (what a kill or revive may name).
        customer_identities: The identities that may speak for a conversation's customer
            (the API, which checked the client's key); a customer's verdict from anyone
            else is refused.
    """

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        act: Act,
        graph: Graph,
        killed_agents: Callable[[], Mapping[str, KillSwitch]],
        *,
        operator_identities: tuple[str, ...],
        claim_ttl_s: float = 900.0,
        approvers: Mapping[str, Sequence[str]] | None = None,
        agents: Collection[str] = (),
        customer_identities: tuple[str, ...] = (),
    ) -> None:
        super().__init__(nc, subjects.operator_requests(), msgspec.json.Decoder(OperatorInput))
        self._approvers = approvers or {}
        self._agents = frozenset(agents)
        self._customer_inboxes = tuple(f"{subjects.inbox_prefix(i)}." for i in customer_identities)
        self._pool = pool
        self._act = act
        self._graph = graph
        self._killed_agents = killed_agents
        self._inboxes = tuple(f"{subjects.inbox_prefix(identity)}." for identity in operator_identities)
        self._claim_ttl_s = claim_ttl_s

    def answers_to(self, requester: Requester, reply: str) -> bool:
        """Answers go to the operators' inboxes, and nowhere else."""
        return reply.startswith(self._inboxes)

    def poison_answer(self, reason: str) -> OperatorAnswer:
        return OperatorAnswer(status="refused", reason=f"the request was refused: {reason}")

    async def answer(self, request: OperatorInput, requester: Requester) -> OperatorAnswer:
        """Do what the operator asks, or say why not (``OperatorRequest``; an approval's
        ``ApprovalVerdict``; a kill or revive's ``SwitchRequest``)."""
        if not request.by.strip():
            return OperatorAnswer(
                status="refused", reason="an operator action needs the operator's name (by)"
            )
        if isinstance(request, ApprovalVerdict):
            if request.customer and not (requester.msg.reply or "").startswith(self._customer_inboxes):
                return OperatorAnswer(
                    status="refused", reason="only the API speaks for a customer (with the client's key)"
                )
            return await take_verdict(self._pool, self._act, request, self._approvers)
        if isinstance(request, SwitchRequest):
            return await flip_switch(self._pool, self._nc.jetstream(), request, self._agents)
        if request.action == "claim":
            return await self._claim(request)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_HOLDER, request.conversation, request.id)
        if row is None:
            return OperatorAnswer(status="refused", reason=f"no conversation {request.conversation!r}")
        if row["done"] is not None:
            return _answer(row, "ok")  # sent again: it was done once
        if row["claimed_by"] != request.by or not row["live"]:
            holder = f"claimed by {row['claimed_by']}" if row["live"] else "not claimed"
            reason = (
                f"conversation {request.conversation} is {holder}: "
                f"`corral claim {request.conversation} --by {request.by}` first"
            )
            await self._record(request, row["customer"], f"refused: {reason}", keep_claim=False)
            return _answer(row, "refused", reason)
        why: str | None = None
        done_before = False

        def decide(record: ConversationRecord) -> Decision:
            nonlocal why, done_before
            if request.action == "reply" and any(
                t.id == request.id for t in record.turns if t.role == "human"
            ):
                done_before = True  # its answer was lost (a restart before the record): once
                return Decision(record=None)
            why = _takeover.problem(record, request)
            if why is not None:
                return Decision(record=None)
            if request.action == "reply":
                return _takeover.replied(record, request)
            if request.action == "close":
                return _takeover.closed(record, request)
            handed = _takeover.handed_back(record, request, self._graph, self._killed_agents())
            if isinstance(handed, str):
                why = handed
                return Decision(record=None)
            return handed

        decision = await self._act(request.conversation, decide)
        outcome = (
            "applied" if why is None and (decision.record is not None or done_before) else f"refused: {why}"
        )
        expires = await self._record(request, row["customer"], outcome, keep_claim=request.action == "reply")
        if why is not None:
            return OperatorAnswer(
                status="refused", reason=why, claimed_by=request.by, claim_expires_at=expires
            )
        held = request.action == "reply"
        return OperatorAnswer(
            status="ok", claimed_by=request.by if held else "", claim_expires_at=expires if held else 0.0
        )

    async def _claim(self, request: OperatorRequest) -> OperatorAnswer:
        async with self._pool.acquire() as conn, conn.transaction():
            won = await conn.fetchrow(_CLAIM, request.conversation, request.by, self._claim_ttl_s)
            row = await conn.fetchrow(_HOLDER, request.conversation, request.id)
            if row is None:
                return OperatorAnswer(status="refused", reason=f"no conversation {request.conversation!r}")
            if won is None:
                reason = (
                    f"conversation {request.conversation} is claimed by {row['claimed_by']}"
                    if row["status"] == "escalated" and row["live"]
                    else f"conversation {request.conversation} is {row['status']}, not in the human queue"
                )
                await append_audit(conn, _entry(request, row["customer"], f"refused: {reason}"))
                return _answer(row, "refused", reason)
            await append_audit(conn, _entry(request, row["customer"], "applied"))
        return OperatorAnswer(status="ok", claimed_by=won["claimed_by"], claim_expires_at=won["expires_at"])

    async def _record(
        self, request: OperatorRequest, customer: str, outcome: str, *, keep_claim: bool
    ) -> float:
        """The action, done once (by its id), in the audit chain; the claim renewed (a reply)
        or let go (a handback, a close); when the claim lapses now (0: it was let go)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await append_audit(conn, _entry(request, customer, outcome))
            if outcome != "applied":
                return 0.0
            await conn.execute(
                "INSERT INTO operator_actions (id, conversation, action, by) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (id) DO NOTHING",
                request.id,
                request.conversation,
                request.action,
                request.by,
            )
            if keep_claim:
                expires: float = await conn.fetchval(
                    "UPDATE conversation_claims SET expires_at = now() + make_interval(secs => $2)"
                    " WHERE conversation = $1 RETURNING extract(epoch FROM expires_at)::float8",
                    request.conversation,
                    self._claim_ttl_s,
                )
                return expires
            await conn.execute(
                "DELETE FROM conversation_claims WHERE conversation = $1", request.conversation
            )
        return 0.0


def _answer(row: asyncpg.Record, status: Literal["ok", "refused"], reason: str = "") -> OperatorAnswer:
    """An answer naming who holds the conversation's claim now, and until when."""
    live = bool(row["live"])
    return OperatorAnswer(
        status=status,
        reason=reason,
        claimed_by=row["claimed_by"] if live else "",
        claim_expires_at=row["expires_at"] if live else 0.0,
    )


def _entry(request: OperatorRequest, customer: str, outcome: str) -> AuditEntry:
    """The audit record of an operator's action."""
    arguments = {"text": request.text, "agent": request.agent, "note": request.note, "id": request.id}
    return AuditEntry(
        agent=request.by,
        credential_id="admin",
        on_behalf_of=customer,
        conversation=request.conversation,
        action=f"queue.{request.action}",
        arguments_digest=digest_arguments(arguments),
        decision="operator",
        outcome=outcome,
        detail=request.agent if request.action == "handback" else "",
    )

"""The HTTP API's desk in the supervisor: whose an API key is, a conversation as the API
shows it, the human queue. The API process holds no database credentials; it asks here
(``corral.api.requests``, published by the API's identity only, answered to its inbox
only). Reads only: everything the API changes goes through the supervisor's inputs
(starts and customer messages) or the operators' desk (``_human_desk``)."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client

from corral.bus import (
    ApiAnswer,
    ApiRequest,
    ApprovalsQuery,
    ApprovalsView,
    ConsoleQuery,
    ConsoleView,
    ConversationQuery,
    ConversationView,
    Hop,
    KeyCheck,
    KeyInfo,
    LoginGranted,
    LoginRedeem,
    PendingApproval,
    QueueQuery,
    QueueView,
    Requester,
    RequestService,
    Turn,
    subjects,
)
from corral.supervisor.gateway._approvals import pending_approvals
from corral.supervisor.store import _console as console
from corral.supervisor.store._reports import human_queue

_APPROVAL_FIELDS = ("id", "conversation", "customer", "agent", "tool", "arguments", "approver", "policy_ids")

_hops = msgspec.json.Decoder(list[Hop])
_turns = msgspec.json.Decoder(list[Turn])

_KEY = "SELECT id, client, customer, operator FROM api_keys WHERE digest = $1 AND revoked_at IS NULL"

_CONVERSATION = """
SELECT c.id, c.client, c.customer, c.status, c.current_agent, c.path::text AS path,
    c.turns::text AS turns, c.reply, c.reason,
    extract(epoch FROM c.created_at)::float8 AS created_at,
    extract(epoch FROM c.updated_at)::float8 AS updated_at,
    coalesce((SELECT s.cost_usd FROM conversation_spend s WHERE s.conversation = c.id), 0)::float8
        AS cost_usd,
    a.id AS approval_id, a.tool AS approval_tool, a.approver AS approval_approver, a.reason AS approval_reason
FROM conversations c
LEFT JOIN approvals a ON a.id = c.approval_id AND c.status = 'waiting'
WHERE c.id = $1
"""


class ApiDesk(RequestService[ApiRequest, ApiAnswer]):
    """Answer the API's questions until ``shutdown()``.

    Args:
        nc: The supervisor's NATS connection.
        pool: PostgreSQL.
        api_identity: The identity the API asks as (answers go to its inbox only).
    """

    def __init__(self, nc: Client, pool: asyncpg.Pool, *, api_identity: str) -> None:
        super().__init__(nc, subjects.api_requests(), msgspec.json.Decoder(ApiRequest))
        self._pool = pool
        self._inbox = f"{subjects.inbox_prefix(api_identity)}."

    def answers_to(self, requester: Requester, reply: str) -> bool:
        """Answers go to the API's inbox, and nowhere else."""
        return reply.startswith(self._inbox)

    async def answer(self, request: ApiRequest, requester: Requester) -> ApiAnswer:
        """One question of the API (``ApiRequest``)."""
        async with self._pool.acquire() as conn:
            match request:
                case KeyCheck():
                    row = await conn.fetchrow(_KEY, request.digest)
                    if row is None:
                        return KeyInfo(found=False)
                    return KeyInfo(
                        found=True,
                        key_id=row["id"],
                        client=row["client"],
                        customer=row["customer"] or "",
                        operator=row["operator"],
                    )
                case ConversationQuery():
                    return _view(await conn.fetchrow(_CONVERSATION, request.conversation))
                case QueueQuery():
                    return QueueView(items=await human_queue(conn, max(1, min(request.limit, 1000))))
                case ApprovalsQuery():
                    pending = await pending_approvals(self._pool)
                    return ApprovalsView(
                        items=[{k: getattr(a, k) for k in _APPROVAL_FIELDS} for a in pending if not a.expired]
                    )
                case ConsoleQuery():
                    return ConsoleView(items=await _console_items(conn, request))
                case LoginRedeem():
                    operator = await console.redeem_login(
                        conn, request.login_digest, request.key_id, request.key_digest
                    )
                    if operator is None:
                        return LoginGranted(granted=False, reason="the login is unknown, used or expired")
                    return LoginGranted(granted=True, operator=operator)


async def _console_items(conn: asyncpg.Connection, query: ConsoleQuery) -> list[dict[str, Any]]:
    match query.topic:
        case "conversations":
            return await console.conversations(
                conn, status=query.status, agent=query.agent, limit=query.limit
            )
        case "trace":
            return await console.trace(conn, query.conversation)
        case "graph":
            return await console.graph_counts(conn)
        case "agents":
            return await console.agents(conn)
        case "alerts":
            return await console.recent_alerts(conn, query.limit)


def _view(row: asyncpg.Record | None) -> ConversationView:
    if row is None:
        return ConversationView(found=False)
    approval = (
        PendingApproval(
            id=row["approval_id"],
            tool=row["approval_tool"],
            approver=row["approval_approver"],
            reason=row["approval_reason"] or "",
        )
        if row["approval_id"]
        else None
    )
    return ConversationView(
        found=True,
        conversation=row["id"],
        client=row["client"],
        customer=row["customer"],
        status=row["status"],
        current_agent=row["current_agent"],
        path=_hops.decode(row["path"]),
        transcript=_turns.decode(row["turns"]),
        reply=row["reply"],
        reason=row["reason"],
        pending_approval=approval,
        cost_usd=row["cost_usd"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )

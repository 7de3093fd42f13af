"""The step journal service: agents journal each model response here before using it,
and a redelivered step reads back what was journaled instead of asking the model again.

Agents hold no database credentials, so they reach the journal over NATS
(``corral.from.<agent>.journal``, request/reply); the sender is the subject's token.
Each write also records the call's spend and answers whether the step may go on.
"""

from __future__ import annotations

import logging

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus import JournalEntry, JournalQuery, JournalReply, JournalRequest, MessageService, encode, subjects
from supervisor._budgets import Budgets, exceeded, record_spend

logger = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(JournalRequest)


class JournalService(MessageService):
    """Answer journal requests until ``shutdown()``.

    Args:
        nc: A NATS connection (the supervisor's identity).
        pool: PostgreSQL.
        budgets: The limits every answer checks.
    """

    def __init__(self, nc: Client, pool: asyncpg.Pool, budgets: Budgets) -> None:
        super().__init__(nc, subjects.all_agent_journals(), queue="journal")
        self._pool = pool
        self._budgets = budgets

    async def on_message(self, msg: Msg) -> None:
        """Answer one journal request (no answer on failure: the agent retries)."""
        sender = subjects.sender(msg.subject) or ""
        try:
            request = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("undecodable journal request from %s: %s", sender, exc)
            return
        try:
            reply = await self.handle(request, sender)
        except Exception:
            # No answer: the agent's step fails retryably and is redelivered.
            logger.exception("journal request from %s failed", sender)
            return
        if msg.reply:
            await msg.respond(encode(reply))

    async def handle(self, request: JournalRequest, sender: str) -> JournalReply:
        """Write an entry (first write wins) or read a step's entries; check the budgets."""
        if request.agent != sender:
            return JournalReply(verdict="stop", reason=f"request claims to come from {request.agent!r}")
        async with self._pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchrow(
                "SELECT status, current_agent, step FROM conversations WHERE id=$1", request.conversation
            )
            if owner is None or owner["current_agent"] != sender or owner["step"] != request.step:
                return JournalReply(verdict="stop", reason=f"step {request.step} is not {sender}'s turn")
            if owner["status"] != "running":
                return JournalReply(verdict="stop", reason=f"the conversation is {owner['status']}")
            match request:
                case JournalEntry():
                    inserted = await conn.fetchval(
                        "INSERT INTO step_journal (conversation, step, idx, agent, text, model,"
                        " input_tokens, output_tokens, cost_usd) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
                        " ON CONFLICT DO NOTHING RETURNING 1",
                        request.conversation,
                        request.step,
                        request.index,
                        sender,
                        request.text,
                        request.model,
                        request.input_tokens,
                        request.output_tokens,
                        request.cost_usd,
                    )
                    if inserted:
                        await record_spend(
                            conn,
                            request.conversation,
                            sender,
                            request.input_tokens + request.output_tokens,
                            request.cost_usd,
                        )
                    entries: list[JournalEntry] = []
                case JournalQuery():
                    rows = await conn.fetch(
                        "SELECT idx, text, model, input_tokens, output_tokens, cost_usd FROM step_journal"
                        " WHERE conversation=$1 AND step=$2 ORDER BY idx",
                        request.conversation,
                        request.step,
                    )
                    entries = [
                        JournalEntry(
                            conversation=request.conversation,
                            step=request.step,
                            index=r["idx"],
                            agent=sender,
                            text=r["text"],
                            model=r["model"],
                            input_tokens=r["input_tokens"],
                            output_tokens=r["output_tokens"],
                            cost_usd=r["cost_usd"],
                        )
                        for r in rows
                    ]
            reason = await exceeded(conn, self._budgets, request.conversation, sender)
        if reason is not None:
            return JournalReply(entries=entries, verdict="stop", reason=reason)
        return JournalReply(entries=entries)

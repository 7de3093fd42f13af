"""The step journal: every model answer, written by the model gateway before the agent sees
it, with its spend in the ledger.

The model gateway (``router.ModelGateway``, through ``store._model_ledger``) is its one
writer: it journals each answer under (conversation, step, index) on the caller's running
turn, with the tool calls, tier, model, confidence, tokens and dollars it really had, and
answers a call asked again from here. Agents report no model answer and no usage.

A redelivered or resumed step asks whether it may go on (``corral.from.<agent>.journal``,
request/reply: the sender is the subject's token): its turn, its kill switch, its budgets.
Agents hold no database credentials, so they ask over NATS.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from corral.bus import (
    MAX_TOKENS_PER_RESPONSE,
    MAX_USD_PER_RESPONSE,
    Attempt,
    ChatToolCall,
    JournalEntry,
    JournalQuery,
    JournalReply,
    JournalRequest,
    Requester,
    RequestService,
    subjects,
)
from corral.supervisor.errors import StoreError
from corral.supervisor.store._agent_controls import agent_killed
from corral.supervisor.store._budgets import Budgets, exceeded
from corral.supervisor.store._sql import Numbered, numbered

logger = logging.getLogger(__name__)

_decoder: msgspec.json.Decoder[JournalQuery] = msgspec.json.Decoder(JournalQuery)


class JournalEntryError(StoreError):
    """A response's figures are negative or absurd: it is refused, never journaled or
    counted (budgets would believe them). Never retryable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def entry_problem(entry: JournalEntry) -> str | None:
    """Why ``entry``'s spend cannot be believed (negative, not finite, or past sane bounds),
    or None."""
    for name in ("input_tokens", "output_tokens"):
        tokens = getattr(entry, name)
        if not 0 <= tokens <= MAX_TOKENS_PER_RESPONSE:
            return f"{name} {tokens} is outside 0..{MAX_TOKENS_PER_RESPONSE}"
    cost = entry.cost_usd
    if not 0.0 <= cost <= MAX_USD_PER_RESPONSE:  # NaN fails both comparisons
        return f"cost_usd {cost} is outside 0..{MAX_USD_PER_RESPONSE:g}"
    return None


def journal_ctes(source: str) -> str:
    """SQL common table expressions that journal one response and record its agent's spend.

    The response's fields are the parameters ``$response_*`` of ``journal_values`` (numbered
    with the rest of the statement by ``store._sql.numbered``); a row of ``source`` (a FROM
    clause) must exist for the entry to be written. Data-modifying CTEs run to completion
    whether or not the outer query reads them, all on one snapshot; the agent's spend counts
    the call whether or not its entry was written (the gateway made it, so it was paid for).
    (A conversation's spend is the view ``conversation_spend`` over the journal.)
    """
    return f"""
entry AS (
    INSERT INTO step_journal
        (conversation, step, idx, agent, text, model, input_tokens, output_tokens, cost_usd,
         tool_calls, tier, confidence, attempts)
    SELECT $response_conversation::text, $response_step::integer, $response_index::integer,
        $response_agent::text, $response_text::text, $response_model::text,
        $response_input_tokens::integer, $response_output_tokens::integer,
        $response_cost_usd::double precision, $response_tool_calls::jsonb, $response_tier::text,
        $response_confidence::double precision, $response_attempts::jsonb
    FROM {source}
    ON CONFLICT DO NOTHING
    RETURNING 1
), agent_spent AS (
    -- every call the gateway made was paid for, journaled or not (off its turn, or asked
    -- again); only when dollars change: (agent, day) is one row every call would lock
    INSERT INTO agent_spend (agent, day, cost_usd)
    SELECT $response_agent::text, current_date, $response_cost_usd::double precision
    WHERE $response_cost_usd::double precision > 0
    ON CONFLICT (agent, day) DO UPDATE SET cost_usd = agent_spend.cost_usd + excluded.cost_usd
    RETURNING 1
)"""


def journal_values(entry: JournalEntry, sender: str) -> dict[str, object]:
    """The parameters of ``journal_ctes``; the agent is the subject's sender, not the body's."""
    return {
        "response_conversation": entry.conversation,
        "response_step": entry.step,
        "response_index": entry.index,
        "response_agent": sender,
        "response_text": entry.text,
        "response_model": entry.model,
        "response_input_tokens": entry.input_tokens,
        "response_output_tokens": entry.output_tokens,
        "response_cost_usd": entry.cost_usd,
        "response_tool_calls": _json.encode(entry.tool_calls).decode(),
        "response_tier": entry.tier,
        "response_confidence": entry.confidence,
        "response_attempts": _json.encode(entry.attempts).decode(),
    }


_CONVERSATION = (
    "SELECT id, status, current_agent, step, customer, dry_run, client FROM conversations"
    " WHERE id = $conversation"
)


@functools.cache
def record_statement() -> Numbered:
    """One statement that journals an entry (the parameters of ``journal_values`` and
    ``$conversation``) on its agent's running turn and records its spend; its one row's one
    column is how many entries it wrote (0: not the turn, or the key was journaled first)."""
    turn = (
        "owner WHERE owner.status='running' AND owner.current_agent=$response_agent"
        " AND owner.step=$response_step"
    )
    return numbered(
        f"WITH owner AS ({_CONVERSATION}), {journal_ctes(turn)} SELECT (SELECT count(*) FROM entry)::integer"
    )


@functools.cache
def _statement(with_entry: bool, also: str) -> Numbered:
    return numbered(_text(with_entry, also))


def _text(with_entry: bool, also: str) -> str:
    expressions = ", " + also if also else ""
    if not with_entry:
        return f"SELECT owner.*{expressions} FROM ({_CONVERSATION}) AS owner"
    # The conversation, and (if it is the sender's running turn) the entry and its spend.
    turn = (
        "owner WHERE owner.status='running' AND owner.current_agent=$response_agent"
        " AND owner.step=$response_step"
    )
    return f"WITH owner AS ({_CONVERSATION}), {journal_ctes(turn)} SELECT owner.*{expressions} FROM owner"


async def journal_response(
    conn: asyncpg.Connection,
    conversation: str,
    entry: JournalEntry | None,
    sender: str,
    *,
    also: str = "",
    also_values: Mapping[str, object] | None = None,
) -> asyncpg.Record | None:
    """The conversation (id, status, current agent, step, customer, dry run, client), having
    journaled ``entry`` of ``sender`` with its spend if the step is ``sender``'s running
    turn (first write wins); one statement. None if there is no such conversation.

    Args:
        also: More expressions evaluated on the conversation's row (``owner``) in the same
            statement (say, taking locks), naming their parameters (``$name``: see
            ``store._sql``), whose values are ``also_values``.

    Raises:
        JournalEntryError: if ``entry`` claims negative or absurd spend (nothing is written).
        ValueError: ``also_values`` names a parameter of the journal's own.
    """
    if entry is not None and (problem := entry_problem(entry)) is not None:
        raise JournalEntryError(
            f"response {entry.conversation}/{entry.step}/{entry.index} refused: {problem}"
        )
    values: dict[str, object] = {"conversation": conversation}
    if entry is not None:
        values.update(journal_values(entry, sender))
    if also_values:
        if clash := values.keys() & also_values.keys():
            raise ValueError(f"parameters {sorted(clash)} are the journal's own")
        values.update(also_values)
    statement = _statement(entry is not None, also)
    return await conn.fetchrow(statement.text, *statement.values(values))


def _not_your_turn(owner: asyncpg.Record | None, sender: str, step: int) -> JournalReply | None:
    if owner is None or owner["current_agent"] != sender or owner["step"] != step:
        return JournalReply(verdict="over", reason=f"step {step} is not {sender}'s turn")
    if owner["status"] != "running":
        return JournalReply(verdict="over", reason=f"the conversation is {owner['status']}")
    return None


async def _entries(conn: asyncpg.Connection, request: JournalRequest, sender: str) -> list[JournalEntry]:
    rows = await conn.fetch(
        f"SELECT {ENTRY_COLUMNS} FROM step_journal WHERE conversation=$1 AND step=$2 ORDER BY idx",
        request.conversation,
        request.step,
    )
    return [entry_from_row(r, request.conversation, request.step, sender) for r in rows]


ENTRY_COLUMNS = (
    "idx, text, model, input_tokens, output_tokens, cost_usd, tool_calls::text AS tool_calls, tier,"
    " confidence, attempts::text AS attempts"
)
"""The columns ``entry_from_row`` reads."""

_tool_calls = msgspec.json.Decoder(list[ChatToolCall])
_attempts = msgspec.json.Decoder(list[Attempt])
_json = msgspec.json.Encoder()


def entry_from_row(row: asyncpg.Record, conversation: str, step: int, agent: str) -> JournalEntry:
    """A journal row (``ENTRY_COLUMNS``) as the wire's ``JournalEntry``, once, at the edge."""
    return JournalEntry(
        conversation=conversation,
        step=step,
        index=row["idx"],
        agent=agent,
        text=row["text"],
        model=row["model"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        cost_usd=row["cost_usd"],
        tool_calls=_tool_calls.decode(row["tool_calls"]),
        tier=row["tier"],
        confidence=row["confidence"],
        attempts=_attempts.decode(row["attempts"]),
    )


class JournalService(RequestService[JournalRequest, JournalReply]):
    """Answer journal requests until ``shutdown()``.

    A request that asks for its answer outside its sender's inbox, or does not decode, is
    dead-lettered with the reason and not answered (``RequestService``); one that fails is
    not answered either: the agent's step fails retryably and is redelivered.

    Args:
        nc: A NATS connection (the supervisor's identity).
        pool: PostgreSQL.
        budgets: The limits every answer checks.
        on_over: Called with the conversation when a step is found over, i.e. decided
            while its agent still held the task: the publishes after that decision may
            have been lost (``Supervisor.republish``).
        js: Where dead letters go (default: ``nc``'s JetStream context).
    """

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        budgets: Budgets,
        *,
        on_over: Callable[[str], Awaitable[None]] | None = None,
        js: JetStreamContext | None = None,
    ) -> None:
        super().__init__(nc, subjects.all_agent_journals(), _decoder, js=js, queue="journal")
        self._pool = pool
        self._budgets = budgets
        self._on_over = on_over

    async def answer(self, request: JournalRequest, requester: Requester) -> JournalReply:
        """Answer one journal request from the subject's sender (``handle``)."""
        return await self.handle(request, requester.sender)

    async def handle(self, request: JournalRequest, sender: str) -> JournalReply:
        """A step's entries, and whether the step may go on (its turn, the budgets)."""
        if request.agent != sender:
            return JournalReply(verdict="stop", reason=f"request claims to come from {request.agent!r}")
        async with self._pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchrow(
                "SELECT status, current_agent, step FROM conversations WHERE id=$1", request.conversation
            )
            refusal = _not_your_turn(owner, sender, request.step)
            if refusal is None:
                entries = await _entries(conn, request, sender)
                # The gateway's own view of the kill switch, not the agent's watcher.
                killed = await agent_killed(conn, sender)
                reason = (
                    f"agent {sender} is killed ({killed})"
                    if killed is not None
                    else await exceeded(conn, self._budgets, request.conversation, sender)
                )
        if refusal is not None:
            if owner is not None and self._on_over is not None:
                await self._on_over(request.conversation)
            return refusal
        if reason is not None:
            return JournalReply(entries=entries, verdict="stop", reason=reason)
        return JournalReply(entries=entries)

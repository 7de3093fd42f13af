"""The model gateway's ledger: may a model call be made, and its answer journaled with
its spend (``router.Ledger`` over PostgreSQL).

The check is one statement: the conversation's turn, the call's journaled answer if any,
and the agent's kill switch; budgets, when any applies, are one more. The record is one
statement too: ``store._journal``'s, which writes only on the sender's running turn.

``corral router run`` commits these writes with ``synchronous_commit = off``: the commit
does not wait for the WAL flush. That keeps the journal's promise, because an answer is
only ever acted on through a later synchronous commit (the tool gateway's effect, the
supervisor's decision), and PostgreSQL flushes its WAL in order: the answer is on disk
before anything it caused is. What a crash of PostgreSQL can lose is an answer nothing
acted on yet; its step asks the model again (and that call is paid twice).
"""

from __future__ import annotations

import asyncpg

from corral.bus import JournalEntry, ModelCall
from corral.router import Admission
from corral.supervisor.store._batch import Batcher
from corral.supervisor.store._budgets import Budgets, exceeded
from corral.supervisor.store._journal import (
    ENTRY_COLUMNS,
    entry_from_row,
    entry_problem,
    journal_values,
    record_statement,
)

_ADMIT = f"""
SELECT c.status, c.current_agent, c.step,
    (SELECT coalesce(reason, 'killed') FROM agent_controls
     WHERE agent = $4 AND killed_at IS NOT NULL) AS killed,
    j.*
FROM conversations c
LEFT JOIN LATERAL (
    SELECT {ENTRY_COLUMNS} FROM step_journal
    WHERE conversation = c.id AND step = $2 AND idx = $3
) j ON true
WHERE c.id = $1
"""

_READ = f"SELECT {ENTRY_COLUMNS} FROM step_journal WHERE conversation=$1 AND step=$2 AND idx=$3"


class ModelLedger:
    """The journal and the budgets, as the model gateway checks and records calls.

    Args:
        pool: PostgreSQL (the supervisor's role).
        budgets: The limits every call is checked against before it is made.
    """

    def __init__(self, pool: asyncpg.Pool, budgets: Budgets) -> None:
        self._pool = pool
        self._budgets = budgets
        # Answers that arrive while others are being written go together: one round trip
        # and one commit for many (``store._batch``).
        self._batcher = Batcher(pool)

    async def close(self) -> None:
        """Stop writing (what was not written yet fails, and its call is asked again)."""
        await self._batcher.close()

    async def admit(self, call: ModelCall, sender: str) -> Admission:
        """Whether ``sender`` may make ``call`` now (``router.Ledger.admit``).

        A step's first delivery of an agent no budget applies to is let through without a
        read: nothing can stop its call here that the record does not see (the turn, a
        journaled answer), and the record meters the call whatever it finds. (A killed
        agent's identity is revoked at the broker; the tool gateway and the supervisor
        refuse what it sends.) Any budget, or a step delivered before, is read first.
        """
        if not call.again and not self._budgets.limits(sender):
            return Admission()
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_ADMIT, call.conversation, call.step, call.index, sender)
            if row is None:
                return Admission(refusal=f"there is no conversation {call.conversation!r}")
            if row["idx"] is not None:
                return Admission(journaled=entry_from_row(row, call.conversation, call.step, sender))
            if row["current_agent"] != sender or row["step"] != call.step:
                return Admission(refusal=f"step {call.step} is not {sender}'s turn")
            if row["status"] != "running":
                return Admission(refusal=f"the conversation is {row['status']}")
            if row["killed"] is not None:
                return Admission(refusal=f"agent {sender} is killed ({row['killed']})")
            reason = await exceeded(conn, self._budgets, call.conversation, sender)
        return Admission(refusal=reason)

    async def record(self, entry: JournalEntry) -> JournalEntry | None:
        """Journal ``entry`` with its spend on its agent's running turn
        (``router.Ledger.record``)."""
        problem = entry_problem(entry)
        if problem is not None:
            # The gateway's own figures: a provider that reports nonsense is clamped, not
            # believed (and not journaled past sane bounds).
            raise ValueError(f"the model's figures cannot be journaled: {problem}")
        statement = record_statement()
        values = {"conversation": entry.conversation, **journal_values(entry, entry.agent)}
        if await self._batcher.fetchval(statement.text, *statement.values(values)):
            return entry
        # Not written: another call of this key was journaled first (its answer wins), or
        # the turn is over.
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_READ, entry.conversation, entry.step, entry.index)
        if row is None:
            return None
        return entry_from_row(row, entry.conversation, entry.step, entry.agent)

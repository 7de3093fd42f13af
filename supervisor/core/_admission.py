"""Fair starts: each client runs at most its share of conversations at once; the rest wait.

A flood of starts from one client must not make another client's conversation wait behind
it. The bus delivers starts in order and the agents' inboxes are queues, so the supervisor
admits each client's conversations to its agents up to ``conversation.max_running_per_client``
at a time: a start past it is recorded (nothing is lost, and the API answers at once) with
status ``queued``, and is admitted, oldest first, when one of the client's running
conversations stops running (it replies, asks the customer, waits for an approval, ends).
Another client's start finds its own share free and goes to the agents at once, ahead of
the flood's queue.

The counts are kept from the decisions the supervisor saves, and read again from
PostgreSQL at start and every ``sweep_s`` (a supervisor that crashed, or a count that
drifted, admits what waits). Two starts of one client decided at the same moment may both
find the last free place: the share is exceeded by at most the supervisor's messages in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import asyncpg

from corral.bus import KillSwitch
from corral.supervisor.core._graph import Decision
from corral.supervisor.store._store import ConversationRecord, StepRecord

logger = logging.getLogger(__name__)

_COUNTS = (
    "SELECT client, count(*) FILTER (WHERE status = 'running') AS running,"
    " count(*) FILTER (WHERE status = 'queued') AS queued"
    " FROM conversations WHERE status IN ('running', 'queued') GROUP BY client"
)
_ADMITTED_BEFORE = (
    "SELECT c.id FROM conversations c WHERE c.status = 'running' AND c.step = 1"
    " AND EXISTS (SELECT 1 FROM conversation_steps s WHERE s.conversation = c.id AND s.kind = 'queued')"
)
"""Conversations admitted from the queue and not yet past their first step: a supervisor
that died between saving an admission and publishing its task left no one to publish it."""
_OLDEST = (
    "SELECT id FROM conversations WHERE client = $1 AND status = 'queued' ORDER BY created_at, id LIMIT $2"
)


class Admission:
    """Which client may start another conversation now, and admitting those that wait.

    Args:
        pool: PostgreSQL.
        admit: Admits one queued conversation (the supervisor's decision, saved and published).
        republish: Publishes again what a conversation's state implies (its task).
        share: The conversations one client may have running at once.
        sweep_s: How often the counts are read again and waiting conversations admitted.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        admit: Callable[[str], Awaitable[object]],
        republish: Callable[[str], Awaitable[None]],
        share: int,
        sweep_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._admit = admit
        self._republish = republish
        self.share = share
        self._sweep_s = sweep_s
        self._running: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def has_room(self, client: str) -> bool:
        """Whether ``client`` may have one more conversation running now."""
        return self._running[client] < self.share and not self._queued[client]

    def saw(self, before: str | None, after: ConversationRecord) -> None:
        """A saved decision moved a conversation from status ``before`` (None: it is new) to
        ``after``'s: count it, and admit the client's next if a place came free."""
        status, client = after.status, after.client
        if before == status:
            return
        if before == "running":
            self._running[client] -= 1
        elif before == "queued":
            self._queued[client] -= 1
        if status == "running":
            self._running[client] += 1
        elif status == "queued":
            self._queued[client] += 1
        if before == "running" and self._queued[client] > 0:
            self._spawn(client)

    def _spawn(self, client: str) -> None:
        task = asyncio.create_task(self.admit_waiting(client), name=f"corral-admit-{client}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def admit_waiting(self, client: str) -> None:
        """Admit ``client``'s oldest queued conversations into its free places."""
        lock = self._locks.setdefault(client, asyncio.Lock())
        async with lock:
            free = self.share - self._running[client]
            if free <= 0 or self._queued[client] <= 0:
                return
            try:
                rows = await self._pool.fetch(_OLDEST, client, free)
                for row in rows:
                    await self._admit(row["id"])
            except Exception:
                # The next sweep admits them: nothing is lost, they stay queued.
                logger.warning("could not admit the queued conversations of %s", client, exc_info=True)

    async def sweep(self) -> None:
        """Read the counts again, and admit what waits where a place is free."""
        rows = await self._pool.fetch(_COUNTS)
        self._running = Counter({r["client"]: r["running"] for r in rows})
        self._queued = Counter({r["client"]: r["queued"] for r in rows})
        for client, waiting in list(self._queued.items()):
            if waiting and self._running[client] < self.share:
                await self.admit_waiting(client)

    async def recover(self) -> None:
        """Publish again the tasks of the conversations admitted before a restart that are
        still at their first step (the same message ids: JetStream drops what it has; a task
        delivered twice is answered from the journal and the ledger)."""
        for row in await self._pool.fetch(_ADMITTED_BEFORE):
            await self._republish(row["id"])

    async def run(self) -> None:
        """Recover, then sweep now and every ``sweep_s``, until cancelled."""
        try:
            while True:
                try:
                    await self.recover()
                    break
                except Exception:
                    logger.warning(
                        "could not republish the admitted conversations; trying again", exc_info=True
                    )
                    await asyncio.sleep(self._sweep_s)  # the retry's pause, not a wait for a condition
            while True:
                try:
                    await self.sweep()
                except Exception:
                    logger.warning("the admission sweep failed; trying again", exc_info=True)
                await asyncio.sleep(self._sweep_s)  # the sweep's period, not a wait for a condition
        finally:
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)


def admitted(record: ConversationRecord, killed_agents: Mapping[str, KillSwitch] | None = None) -> Decision:
    """A queued conversation's turn came (its client has a place free): it starts now."""
    if record.status != "queued":
        return Decision(record=None)
    killed = (killed_agents or {}).get(record.current_agent)
    if killed is not None:
        reason = f"entry agent {record.current_agent} is killed ({killed.reason}); escalated to a human"
        return Decision(
            record=record.evolve(status="escalated", reason=reason),
            steps=[StepRecord(step=1, agent=record.current_agent, kind="escalated", detail=reason)],
        )
    return Decision(
        record=record.evolve(status="running"),
        steps=[StepRecord(step=1, agent=record.current_agent, kind="started")],
    )

"""The anomaly watches. The supervisor's: every tool call the gateway decided (read from the audit
chain, where every one of them is, whoever made it and whatever was decided) and every
ended conversation's cost (its path from ``conversation.ended``, its cost from the spend
ledger), fed to the detectors of ``_anomalies``; what they raise is published on
``corral.alerts`` (``AlertKeeper`` stores it and acts on it).

It reads the audit chain by id from where it started, once per ``every_s``: nothing is
added to the path a call or a step takes. A row whose id was taken before one it already
read but committed after is not counted (an alert is an estimate, the chain the record).

The model gateway's: every call's attempts, counted toward each model (a retry storm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client

from corral.bus import Alert, Attempt, ClientUpdate, ConversationEnded, Service, encode, subjects
from corral.supervisor.config._sections import AlertsSection
from corral.supervisor.core._anomalies import CostWatch, RetryStormWatch, ToolCallWatch

logger = logging.getLogger(__name__)

_CALLS = """
SELECT id, extract(epoch FROM created_at)::float8 AS at, agent, conversation, action, arguments_digest
FROM audit_log
WHERE id > $1 AND credential_id LIKE 'agent-%'
ORDER BY id
LIMIT 5000
"""
_COSTS = "SELECT conversation, cost_usd FROM conversation_spend WHERE conversation = ANY($1::text[])"


_updates = msgspec.json.Decoder(ClientUpdate)


class AnomalyWatch(Service):
    """Watch the tool calls and the conversations' costs; publish the alerts raised."""

    def __init__(
        self, nc: Client, pool: asyncpg.Pool, section: AlertsSection, *, every_s: float = 1.0
    ) -> None:
        super().__init__()
        self._nc = nc
        self._pool = pool
        self._every_s = every_s
        self._calls = ToolCallWatch(section)
        self._costs = CostWatch(section)
        self._last_id = 0
        self._ended: list[tuple[str, str]] = []
        self.raised = 0

    async def _serve(self) -> None:
        self._last_id = int(await self._pool.fetchval("SELECT coalesce(max(id), 0) FROM audit_log"))
        sub = await self._nc.subscribe(subjects.all_conversation_outcomes(), cb=self._outcome)
        self._started.set()
        try:
            while not self._stopping.is_set():
                try:
                    await self.check()
                except (asyncpg.PostgresError, OSError) as exc:
                    logger.warning("the anomaly watch could not read PostgreSQL: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._every_s)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _outcome(self, msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            update = _updates.decode(msg.data)
            if isinstance(update, ConversationEnded):
                path = " -> ".join(hop.agent for hop in update.path)
                self._ended.append((update.conversation, path))

    async def check(self) -> None:
        """Read what happened since the last check, and publish what it raises."""
        raised: list[Alert] = []
        while True:
            rows = await self._pool.fetch(_CALLS, self._last_id)
            for row in rows:
                raised += self._calls.observe(
                    row["agent"], row["conversation"], row["action"], row["arguments_digest"], row["at"]
                )
            if rows:
                self._last_id = rows[-1]["id"]
            if len(rows) < 5000:
                break
        if self._ended:
            ended, self._ended = self._ended, []
            costs = {
                r["conversation"]: r["cost_usd"]
                for r in await self._pool.fetch(_COSTS, [conversation for conversation, _ in ended])
            }
            now = time.time()
            for conversation, path in ended:
                raised += self._costs.observe(conversation, path, float(costs.get(conversation, 0.0)), now)
        for alert in raised:
            await publish_alert(self._nc, alert)
            self.raised += 1


async def publish_alert(nc: Client, alert: Alert) -> None:
    """Say ``alert`` on ``corral.alerts`` (stored in ``CORRAL_EVENTS``), and log it."""
    logger.warning("alert %s: %s", alert.kind, alert.reason)
    with contextlib.suppress(Exception):
        await nc.publish(subjects.alerts(), encode(alert))


def retry_storm_observer(nc: Client, section: AlertsSection) -> Callable[[str, Sequence[Attempt]], None]:
    """What the model gateway tells each call's attempts to (``on_attempts``): the retry-storm
    detector, whose alerts go out on ``corral.alerts`` from the gateway's own connection."""
    watch = RetryStormWatch(section)
    sending: set[asyncio.Task[None]] = set()

    def observe(agent: str, attempts: Sequence[Attempt]) -> None:
        now = time.time()
        for attempt in attempts:
            for alert in watch.observe(attempt.model, agent, attempt.outcome, now):
                task = asyncio.ensure_future(publish_alert(nc, alert))
                sending.add(task)
                task.add_done_callback(sending.discard)

    return observe

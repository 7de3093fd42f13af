"""The supervisor's state in PostgreSQL: conversations and their steps, via asyncpg.

Migrations are numbered SQL files in ``supervisor/store/migrations``, applied in order at start
under an advisory lock, each once, recorded in ``corral_migrations``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Literal

import asyncpg
import msgspec

from corral.bus import ConversationStatus, Hop, JournalEntry, Turn, subjects
from corral.supervisor.errors import ConcurrentChange, StoreError
from corral.supervisor.store._batch import Batcher
from corral.supervisor.store._journal import journal_ctes, journal_values
from corral.supervisor.store._sql import numbered
from corral.supervisor.store._unavailable import UNAVAILABLE, unavailable

logger = logging.getLogger(__name__)

_MIGRATIONS = "corral.supervisor.store.migrations"

_MIGRATION_LOCK = 0x636F7272  # "corr": one advisory lock id for every corral process

_path_decoder = msgspec.json.Decoder(list[Hop])
_turns_decoder = msgspec.json.Decoder(list[Turn])
_encoder = msgspec.json.Encoder()


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection returned without a reset query, unless a tool's own statements ran
    on it.

    corral keeps no session state (advisory locks are transaction-scoped; no LISTEN, no
    SET), so the default reset (``RESET ALL``, ``UNLISTEN *``, ...) would only cost a
    round trip per release; an open transaction is still rolled back by asyncpg. A tool
    body's statements are another matter: one that sets a session setting
    (``SET default_transaction_read_only = on``) would leave it to whatever uses the
    connection next, so such a connection is reset.
    """

    _ran_tool_statements = False

    def ran_tool_statements(self) -> None:
        """Reset this connection when it goes back to the pool (see ``needs_reset``)."""
        self._ran_tool_statements = True

    def get_reset_query(self) -> str:
        if not self._ran_tool_statements:
            return ""
        self._ran_tool_statements = False
        return super().get_reset_query()  # type: ignore[no-any-return]


def needs_reset(conn: object) -> None:
    """``conn`` (a store connection, pooled or not) ran a tool's own statements: reset its
    session when it is released. A no-op for connections that are not the store's."""
    mark = getattr(conn, "ran_tool_statements", None)
    if callable(mark):
        mark()


@dataclass(frozen=True, kw_only=True)
class ConversationRecord:
    """A conversation as the supervisor tracks it."""

    id: str
    text: str
    current_agent: str
    step: int
    status: ConversationStatus = "running"
    customer: str = ""
    path: list[Hop] = field(default_factory=list)
    reply: str | None = None
    reason: str | None = None
    traceparent: str | None = None
    client: str = subjects.DEFAULT_CLIENT
    """The client identity that started it; its updates go to that client only."""
    dry_run: bool = False
    """Tool calls are policy-checked and simulated; nothing changes."""
    approval_id: str | None = None
    """The approval a waiting conversation waits on."""
    resume: int = 0
    """How often the current step was resumed after an approval decision."""
    version: int = 0
    """Bumped by every save; a save applies only to the version its decision read."""
    turns: list[Turn] = field(default_factory=list)
    """The transcript: the customer's messages and the replies, oldest first."""

    def evolve(self, **changes: object) -> ConversationRecord:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One supervisor decision about a conversation."""

    step: int
    agent: str
    kind: Literal[
        "queued",
        "started",
        "forwarded",
        "refused",
        "replied",
        "asked",
        "answered",
        "closed",
        "escalated",
        "rejected",
        "waiting",
        "resumed",
    ]
    """What was decided: the conversation queued (its client at its share) or started; a
    handoff forwarded or refused; the reply taken; a question to the customer, or the
    customer's answer; the conversation closed (idle) or escalated; an output rejected (not
    the step's); the step waiting for an approval, or resumed after one."""
    target: str | None = None
    confidence: float | None = None
    detail: str = ""


_COLUMNS = (
    "id, customer, text, status, current_agent, step, path::text AS path, reply, reason, traceparent, client,"
    " dry_run, approval_id, resume, version, turns::text AS turns"
)


def _from_row(row: asyncpg.Record) -> ConversationRecord:
    """Convert an asyncpg record into a ``ConversationRecord``, once, at the edge."""
    return ConversationRecord(
        **{
            **dict(row),
            "path": _path_decoder.decode(row["path"]),
            "turns": _turns_decoder.decode(row["turns"]),
        }
    )


_STEPS = (
    "steps AS (INSERT INTO conversation_steps (conversation, step, agent, kind, target, confidence, detail)"
    " SELECT saved.id, s.step, s.agent, s.kind, s.target, s.confidence, s.detail FROM saved,"
    " unnest($step_steps::integer[], $step_agents::text[], $step_kinds::text[], $step_targets::text[],"
    " $step_confidences::double precision[], $step_details::text[])"
    " WITH ORDINALITY AS s(step, agent, kind, target, confidence, detail, n) ORDER BY s.n)"
)

# The conversation and its new steps in one statement: inserted only if it is new,
# updated only if nobody saved it since it was read. No row ends up saved: a conflict.
_INSERT = numbered(
    "WITH saved AS (INSERT INTO conversations (id, customer, text, status, current_agent, step, path,"
    " reply, reason, traceparent, client, dry_run, approval_id, resume, turns)"
    " VALUES ($id, $customer, $text, $status, $current_agent, $step, $path::jsonb, $reply, $reason,"
    " $traceparent, $client, $dry_run, $approval_id, $resume, $turns::jsonb) ON CONFLICT (id) DO NOTHING"
    f" RETURNING id), {_STEPS} SELECT count(*) FROM saved"
)
_SAVE = (
    "WITH saved AS (UPDATE conversations SET status=$status, current_agent=$current_agent, step=$step,"
    " path=$path::jsonb, reply=$reply, reason=$reason, approval_id=$approval_id, resume=$resume,"
    " turns=$turns::jsonb,"
    f" version=version + 1, updated_at=now() WHERE id=$id AND version=$version RETURNING id), {_STEPS}"
)
_UPDATE = numbered(_SAVE + " SELECT count(*) FROM saved")
_RECORD_STEPS = numbered(f"WITH saved AS (SELECT $id::text AS id), {_STEPS} SELECT 1")
# The model response that ended the step is journaled only if the decision is saved.
_UPDATE_WITH_RESPONSE = numbered(_SAVE + ", " + journal_ctes("saved") + " SELECT count(*) FROM saved")


class ConversationSnapshot:
    """A conversation as read for one decision, and how to save what was decided.

    Nothing is locked while the decision is made: ``save`` writes only if the conversation
    is still the version that was read, in one statement, and raises ``ConcurrentChange``
    otherwise (the caller decides again on a fresh snapshot).
    """

    def __init__(
        self,
        db: asyncpg.Pool,
        batcher: Batcher,
        record: ConversationRecord | None,
        on_saved: Callable[[ConversationRecord], None] | None = None,
    ) -> None:
        self._db = db
        self._batcher = batcher
        self.record = record
        self._on_saved = on_saved

    @property
    def db(self) -> asyncpg.Pool:
        """Where to read further while deciding (the pool: nothing is held while deciding)."""
        return self._db

    async def save(
        self,
        record: ConversationRecord,
        steps: list[StepRecord],
        response: tuple[JournalEntry, str] | None = None,
    ) -> None:
        """Write ``record`` (insert or update) with ``steps`` and, for an update, journal the
        model ``response`` (entry, sender) that ended the step; one statement, committed
        in a batch with other conversations' saves (see ``supervisor.store._batch``).

        Raises:
            ConcurrentChange: the conversation was saved by someone else since it was read.
        """
        base = self.record
        values: dict[str, object] = {
            "id": record.id,
            "status": record.status,
            "current_agent": record.current_agent,
            "step": record.step,
            "path": _encoder.encode(record.path).decode(),
            "turns": _encoder.encode(record.turns).decode(),
            "reply": record.reply,
            "reason": record.reason,
            "approval_id": record.approval_id,
            "resume": record.resume,
            **_step_columns(steps),
        }
        if base is None:
            statement = _INSERT
            values.update(
                customer=record.customer,
                text=record.text,
                traceparent=record.traceparent,
                client=record.client,
                dry_run=record.dry_run,
            )
        else:
            statement = _UPDATE if response is None else _UPDATE_WITH_RESPONSE
            values["version"] = base.version
            if response is not None:
                values.update(journal_values(*response))
        saved = await self._batcher.fetchval(statement.text, *statement.values(values))
        if not saved:
            raise ConcurrentChange(f"conversation {record.id} changed while a decision was made")
        self.record = record.evolve(version=0 if base is None else base.version + 1)
        if self._on_saved is not None:
            self._on_saved(self.record)

    async def record_steps(self, conversation: str, steps: list[StepRecord]) -> None:
        """Append ``steps`` without changing the conversation (e.g. a rejected message)."""
        if steps:
            statement = _RECORD_STEPS
            await self._db.execute(
                statement.text, *statement.values({"id": conversation, **_step_columns(steps)})
            )


def _step_columns(steps: list[StepRecord]) -> dict[str, list[object]]:
    return {
        "step_steps": [s.step for s in steps],
        "step_agents": [s.agent for s in steps],
        "step_kinds": [s.kind for s in steps],
        "step_targets": [s.target for s in steps],
        "step_confidences": [s.confidence for s in steps],
        "step_details": [s.detail for s in steps],
    }


class Store:
    """Conversations in PostgreSQL. Open with ``await Store.open(dsn)``."""

    def __init__(self, pool: asyncpg.Pool, *, cache_size: int = 10_000) -> None:
        self._pool = pool
        self._batcher = Batcher(pool)
        self._cache: OrderedDict[str, ConversationRecord] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10, server_settings: dict[str, str] | None = None
    ) -> Store:
        """Connect, apply pending migrations, and return a store.

        Args:
            server_settings: PostgreSQL settings of the pool's sessions.

        Raises:
            StoreError: if PostgreSQL cannot be reached or a migration fails.
        """
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                connection_class=_Connection,
                server_settings=server_settings,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        store = cls(pool)
        try:
            await store.migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    @property
    def batches(self) -> int:
        """Batches of saves written so far (see ``supervisor.store._batch``)."""
        return self._batcher.batches

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (the tool gateway shares it)."""
        return self._pool

    async def close(self) -> None:
        """Close every connection."""
        await self._batcher.close()
        await self._pool.close()

    async def migrate(self) -> list[str]:
        """Apply migrations not yet applied; returns their names."""
        files = sorted(
            (
                f
                for f in resources.files("corral.supervisor.store.migrations").iterdir()
                if f.name.endswith(".sql")
            ),
            key=lambda f: f.name,
        )
        applied: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            # No DDL unless needed: the supervisor's role may not create tables.
            if await conn.fetchval("SELECT to_regclass('corral_migrations')") is None:
                await conn.execute(
                    "CREATE TABLE corral_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM corral_migrations")}
            for file in files:
                version = file.name.removesuffix(".sql")
                if version in done:
                    continue
                try:
                    await conn.execute(file.read_text())
                except asyncpg.PostgresError as exc:
                    raise StoreError(f"migration {file.name} failed: {exc}", retryable=False) from exc
                await conn.execute("INSERT INTO corral_migrations (version) VALUES ($1)", version)
                applied.append(version)
                logger.info("applied migration %s", version)
        return applied

    @contextlib.asynccontextmanager
    async def snapshot(
        self, conversation: str, *, fresh: bool = False, expect_new: bool = False
    ) -> AsyncIterator[ConversationSnapshot]:
        """One conversation for a decision; ``save`` commits what was decided.

        The conversation as this store last saved it is taken from memory unless ``fresh``
        (saves are conditional on the version, so a stale copy only costs a conflict and a
        fresh decision). With ``expect_new`` a conversation not in memory is taken to be new
        without asking PostgreSQL; if it exists after all, the insert conflicts.
        """
        record = None if fresh else self._cache.get(conversation)
        if fresh:
            self._cache.pop(conversation, None)
        try:
            if record is None and not expect_new:
                row = await self._pool.fetchrow(
                    f"SELECT {_COLUMNS} FROM conversations WHERE id=$1", conversation
                )
                record = _from_row(row) if row else None
            yield ConversationSnapshot(self._pool, self._batcher, record, self._remember)
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc

    def _remember(self, record: ConversationRecord) -> None:
        self._cache[record.id] = record
        self._cache.move_to_end(record.id)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def get(self, conversation: str) -> ConversationRecord | None:
        """One conversation, or None."""
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM conversations WHERE id=$1", conversation)
        return _from_row(row) if row else None

    async def steps(self, conversation: str) -> list[StepRecord]:
        """Every recorded step of a conversation, oldest first."""
        rows = await self._pool.fetch(
            "SELECT step, agent, kind, target, confidence, detail FROM conversation_steps"
            " WHERE conversation=$1 ORDER BY id",
            conversation,
        )
        return [StepRecord(**dict(r)) for r in rows]

    async def record_dropped(self, conversation: str, agent: str, step: int, kind: str, reason: str) -> None:
        """Keep a message that was not acted on because of a kill switch."""
        await self._pool.execute(
            "INSERT INTO dropped_messages (conversation, agent, step, kind, reason) VALUES ($1,$2,$3,$4,$5)",
            conversation,
            agent,
            step,
            kind,
            reason,
        )

    async def waiting_for_approval(self, approval_id: str) -> tuple[str, str] | None:
        """(conversation, status of the approval) of a decided approval, if any."""
        row = await self._pool.fetchrow("SELECT conversation, status FROM approvals WHERE id=$1", approval_id)
        return (row["conversation"], row["status"]) if row else None

    async def approval_exists(self, approval_id: str, conversation: str, agent: str) -> bool:
        """Whether the gateway filed approval ``approval_id`` for ``agent`` in
        ``conversation`` and it was not used yet (a step may wait only on such a one)."""
        row = await self._pool.fetchrow(
            "SELECT 1 FROM approvals WHERE id=$1 AND conversation=$2 AND agent=$3 AND status <> 'used'",
            approval_id,
            conversation,
            agent,
        )
        return row is not None

    async def awaiting_since(self, seconds: float, limit: int = 1000) -> list[str]:
        """Conversations that have awaited their customer for more than ``seconds``,
        oldest first (at most ``limit``)."""
        rows = await self._pool.fetch(
            "SELECT id FROM conversations WHERE status='awaiting_customer'"
            " AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
            seconds,
            limit,
        )
        return [r["id"] for r in rows]

    async def waiting_on(self, agent: str) -> list[str]:
        """Running conversations whose next step belongs to ``agent``."""
        rows = await self._pool.fetch(
            "SELECT id FROM conversations WHERE status='running' AND current_agent=$1", agent
        )
        return [r["id"] for r in rows]

    async def counts(self) -> dict[str, int]:
        """Conversations per status."""
        rows = await self._pool.fetch("SELECT status, count(*) AS n FROM conversations GROUP BY 1")
        return {r["status"]: r["n"] for r in rows}

"""Group commit for the supervisor's saves: many conversations' statements in one round trip.

A save waits for no timer: when no batch is in PostgreSQL it goes at once, alone; while a
batch is in PostgreSQL, the saves that arrive meanwhile gather and go together next, the
statements of each kind pipelined in one round trip and one commit (asyncpg's
``fetchmany``, atomic). Under load that is one commit for many decisions instead of one
each; one at a time it costs nothing.

Each statement must return one row whose first column is its answer (for a save, how
many conversations it wrote). A statement that fails takes its batch down with it, so
the batch is then written again statement by statement, each answering for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from supervisor.errors import StoreError

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    query: str
    arguments: Sequence[object]
    answer: asyncio.Future[object] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """Write single-row statements in batches on one pooled connection at a time.

    Args:
        pool: Where the connection comes from (held only while a batch is written).
        max_batch: Statements per round trip at most.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 256) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        """Batches written so far (each one connection, one commit per kind of statement)."""

    async def fetchval(self, query: str, *arguments: object) -> object:
        """The first column of the statement's one row, once it is committed.

        Raises:
            StoreError: PostgreSQL is unavailable (retryable) or refused the statement.
        """
        pending = _Pending(query, arguments)
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="corral-batch-writer")
        return await pending.answer

    async def close(self) -> None:
        """Stop writing; statements not yet written fail."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for pending in self._queue:
            if not pending.answer.done():
                pending.answer.set_exception(StoreError("the store is closed", retryable=True))
        self._queue.clear()

    async def _write_all(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            self.batches += 1
            try:
                async with self._pool.acquire() as conn:
                    for query, group in _by_query(batch).items():
                        await _write(conn, query, group)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
                _fail(batch, StoreError(f"PostgreSQL unavailable: {exc}"))
            except BaseException as exc:
                _fail(batch, StoreError(f"could not write a batch: {exc}", retryable=True))
                raise


def _by_query(batch: list[_Pending]) -> dict[str, list[_Pending]]:
    groups: dict[str, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.query, []).append(pending)
    return groups


async def _write(conn: asyncpg.Connection, query: str, group: list[_Pending]) -> None:
    if len(group) > 1:
        try:
            rows = await conn.fetchmany(query, [pending.arguments for pending in group])
        except asyncpg.PostgresConnectionError:
            raise
        except asyncpg.PostgresError as exc:
            logger.debug("a batch of %d failed (%s); writing them one by one", len(group), exc)
        else:
            for pending, row in zip(group, rows, strict=True):
                _answer(pending, row[0])
            return
    for pending in group:
        try:
            value = await conn.fetchval(query, *pending.arguments)
        except asyncpg.PostgresConnectionError:
            raise
        except asyncpg.PostgresError as exc:
            if not pending.answer.done():
                pending.answer.set_exception(StoreError(f"PostgreSQL refused a save: {exc}", retryable=False))
        else:
            _answer(pending, value)


def _answer(pending: _Pending, value: object) -> None:
    if not pending.answer.done():  # its caller may have been cancelled
        pending.answer.set_result(value)


def _fail(batch: list[_Pending], error: StoreError) -> None:
    for pending in batch:
        if not pending.answer.done():
            pending.answer.set_exception(error)

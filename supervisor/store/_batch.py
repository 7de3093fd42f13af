"""Group commit for the supervisor's saves: many conversations' statements in one round trip.

A save waits for no timer: when nothing is being written it goes at once, alone, on the
caller's own turn; while something is being written, the saves that arrive meanwhile
gather and go together next, the statements of each kind pipelined in one round trip and
one commit (asyncpg's ``fetchmany``, atomic). Under load that is one commit for many
decisions instead of one each; one at a time it costs nothing.

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

from corral.supervisor.errors import StoreError
from corral.supervisor.store._unavailable import UNAVAILABLE, unavailable

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    query: str
    arguments: Sequence[object]
    answer: asyncio.Future[object] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """Write single-row statements, batched while PostgreSQL is busy with earlier ones.

    Args:
        pool: Where connections come from (one held only while something is written).
        max_batch: Statements per round trip at most.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 256) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        """Batches written so far (a lone statement is a batch of one)."""

    async def fetchval(self, query: str, *arguments: object) -> object:
        """The first column of the statement's one row, once it is committed.

        Raises:
            StoreError: PostgreSQL is unavailable (retryable) or refused the statement.
        """
        if not self._writing:
            # Nothing in PostgreSQL: write it now, on this turn; whatever arrives
            # meanwhile gathers for the writer.
            self._writing = True
            self.batches += 1
            try:
                async with self._pool.acquire() as conn:
                    return await _write_one(conn, query, arguments)
            except UNAVAILABLE as exc:
                raise unavailable(exc) from exc
            finally:
                self._writing = False
                self._start_writer()
        pending = _Pending(query, arguments)
        self._queue.append(pending)
        return await pending.answer

    async def close(self) -> None:
        """Stop writing; statements not yet written fail."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        _fail(self._queue, StoreError("the store is closed", retryable=True))
        self._queue.clear()

    def _start_writer(self) -> None:
        if self._queue and not self._writing:
            self._writing = True
            self._writer = asyncio.create_task(self._write_all(), name="corral-batch-writer")

    async def _write_all(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                self.batches += 1
                try:
                    async with self._pool.acquire() as conn:
                        for query, group in _by_query(batch).items():
                            await _write_group(conn, query, group)
                except UNAVAILABLE as exc:
                    _fail(batch, unavailable(exc))
                except asyncio.CancelledError:
                    _fail(batch, StoreError("the store is closed", retryable=True))
                    raise
                except Exception as exc:
                    _fail(batch, StoreError(f"could not write a batch: {exc}", retryable=True))
        finally:
            self._writing = False


def _by_query(batch: list[_Pending]) -> dict[str, list[_Pending]]:
    groups: dict[str, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.query, []).append(pending)
    return groups


async def _write_group(conn: asyncpg.Connection, query: str, group: list[_Pending]) -> None:
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
            _answer(pending, await _write_one(conn, query, pending.arguments))
        except StoreError as exc:
            if not pending.answer.done():
                pending.answer.set_exception(exc)


async def _write_one(conn: asyncpg.Connection, query: str, arguments: Sequence[object]) -> object:
    try:
        return await conn.fetchval(query, *arguments)
    except asyncpg.PostgresConnectionError:
        raise
    except asyncpg.PostgresError as exc:
        raise StoreError(f"PostgreSQL refused a save: {exc}", retryable=False) from exc


def _answer(pending: _Pending, value: object) -> None:
    if not pending.answer.done():  # its caller may have been cancelled
        pending.answer.set_result(value)


def _fail(batch: list[_Pending], error: StoreError) -> None:
    for pending in batch:
        if not pending.answer.done():
            pending.answer.set_exception(error)

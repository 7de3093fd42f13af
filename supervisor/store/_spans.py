"""corral's span store: every process's spans, from ``CORRAL_SPANS`` into PostgreSQL, and
on to an OTLP collector when one is configured.

Each process publishes its finished spans on its own ``corral.spans.<identity>``
(``corral.bus._telemetry``); this writer stores them under that identity, whatever a span
says of itself, a batch of messages in one statement, and acknowledges them once stored
(a span stored twice is one row). What does not decode is dead-lettered with why. Spans
older than the retention are deleted every few minutes.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the same spans go to the collector too, each as
its process's (``service.name`` ``corral-<identity>``), through the supervisor's export
process (``OtlpRelay``): a slow or absent collector drops spans (counted, logged), never
holds up the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from corral.bus import DECODE_ERRORS, Service, dead_letter, subjects
from corral.bus._telemetry import SpanBatch, SpanRecord
from corral.bus.spans import CONVERSATION
from corral.supervisor.store._otlp_relay import OtlpRelay

logger = logging.getLogger(__name__)

_INSERT = """
INSERT INTO spans (trace_id, span_id, parent_id, conversation, name, kind, service,
                   started_at, ended_at, status, status_message, attributes)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[],
                     $12::jsonb[])
ON CONFLICT (trace_id, span_id) DO NOTHING
"""
_PRUNE = """
DELETE FROM spans WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM spans WHERE started_at < $1 LIMIT 10000))
"""

_decoder = msgspec.json.Decoder(SpanBatch)
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
"""What PostgreSQL says of a value it will never take (classes 22, 23 and 54): the message's
fault, not the database's."""
_Received = tuple[Msg, str, SpanBatch]
"""A span message, the identity whose subject carried it, and its spans."""
_encoder = msgspec.json.Encoder()


def _at(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


class SpanWriter(Service):
    """Store the spans of every process; prune what is past ``retention``."""

    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        *,
        retention: timedelta | None,
        prune_every_s: float = 300.0,
        batch: int = 64,
    ) -> None:
        super().__init__()
        self._js = js
        self._pool = pool
        self._retention = retention
        """None: spans are not stored (only exported, if a collector is configured)."""
        self._prune_every_s = prune_every_s
        self._batch = batch
        self._relay = OtlpRelay.from_environment()
        self.stored = 0

    async def _serve(self) -> None:
        config = ConsumerConfig(
            durable_name=subjects.SPAN_WRITER_CONSUMER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=4 * self._batch,
        )
        sub = await self._js.pull_subscribe(
            subjects.all_spans(),
            durable=subjects.SPAN_WRITER_CONSUMER,
            stream=subjects.SPANS_STREAM,
            config=config,
        )
        pruning = asyncio.create_task(self._prune_forever())
        if self._relay is not None:
            await self._relay.start()
        self._started.set()
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(batch=self._batch, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                except Exception as exc:
                    logger.warning("fetching spans failed: %s; retrying", exc)
                    await asyncio.sleep(1)
                    continue
                await self._store(msgs)
        finally:
            pruning.cancel()
            if self._relay is not None:
                await self._relay.close()  # what it holds goes out first
            await asyncio.gather(pruning, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _store(self, msgs: list[Msg]) -> None:
        decoded: list[_Received] = []
        for msg in msgs:
            identity = msg.subject.removeprefix(subjects.spans(""))
            try:
                decoded.append((msg, identity, _decoder.decode(msg.data)))
            except DECODE_ERRORS as exc:
                await self._refuse(msg, f"decode error: {exc}")
        if self._retention is not None and any(batch.spans for _, _, batch in decoded):
            try:
                await self._insert(decoded)
            except _REFUSED:
                # A message holds what PostgreSQL refuses (a NUL in a text, say): each on its
                # own, so that only the one refused is dead-lettered, and nobody else's waits.
                decoded = await self._one_by_one(decoded)
            except (asyncpg.PostgresError, OSError) as exc:
                # Redelivered after ack_wait: nothing is lost while PostgreSQL is away.
                logger.warning("could not store %d span messages: %s", len(decoded), exc)
                return
        for msg, identity, batch in decoded:
            self.stored += len(batch.spans)
            if self._relay is not None and batch.spans:
                # Once stored (a message redelivered after a failed insert is exported once).
                self._relay.put(identity, msg.data, len(batch.spans))
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _insert(self, decoded: list[_Received]) -> None:
        rows = [(span, identity) for _, identity, batch in decoded for span in batch.spans]
        await self._pool.execute(_INSERT, *_columns(rows))

    async def _one_by_one(self, decoded: list[_Received]) -> list[_Received]:
        """Store each message on its own; those stored (what PostgreSQL refuses is
        dead-lettered; after any other failure, the rest are left to redelivery)."""
        stored = []
        for item in decoded:
            try:
                await self._insert([item])
            except _REFUSED as exc:
                await self._refuse(item[0], f"cannot be stored: {exc}")
                continue
            except (asyncpg.PostgresError, OSError) as exc:
                logger.warning("could not store a span message: %s", exc)
                break
            stored.append(item)
        return stored

    async def _refuse(self, msg: Msg, reason: str) -> None:
        await dead_letter(self._js, subjects.dead_letter(msg.subject), msg, reason)
        await msg.term()

    async def prune(self) -> int:
        """Delete the spans past the retention; returns how many."""
        if self._retention is None:
            return 0
        cutoff = datetime.now(UTC) - self._retention
        total = 0
        while True:
            status = await self._pool.execute(_PRUNE, cutoff)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < 10000:
                return total

    async def _prune_forever(self) -> None:
        while True:
            try:
                deleted = await self.prune()
                if deleted:
                    logger.info("deleted %d spans past the retention", deleted)
            except (asyncpg.PostgresError, OSError) as exc:
                logger.warning("could not prune spans: %s", exc)
            await asyncio.sleep(self._prune_every_s)


def _columns(rows: list[tuple[SpanRecord, str]]) -> list[list[object]]:
    columns: list[list[object]] = [[] for _ in range(12)]
    for span, identity in rows:
        values = (
            span.trace_id,
            span.span_id,
            span.parent_id,
            _conversation(span),
            span.name,
            span.kind,
            identity,
            _at(span.start_ns),
            _at(span.end_ns),
            span.status,
            span.status_message,
            _encoder.encode(span.attributes).decode(),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _conversation(span: SpanRecord) -> str:
    """The conversation a span names, if it is an id (what else a process says there is in
    its attributes, not in the index)."""
    named = span.attributes.get(CONVERSATION)
    return named if isinstance(named, str) and subjects.is_id(named) else ""

"""Every process's spans, as ``SpanWriter`` received them, on to an OTLP/HTTP collector.

The exporter is opentelemetry's own (``OTLPSpanExporter``, configured by its environment
variables: endpoint, headers, timeout, compression); each span goes as the process that
sent it (``service.name`` ``corral-<identity>``, from its own spans subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from corral.bus._telemetry import SpanRecord, otlp_endpoint, resource_of

logger = logging.getLogger(__name__)

_KINDS = {kind.name.lower(): kind for kind in SpanKind}
_STATUSES = {code.name.lower(): code for code in StatusCode}


def readable(span: SpanRecord, resource: Resource) -> ReadableSpan:
    """``span`` as the SDK's exporters take one."""
    context = SpanContext(int(span.trace_id, 16), int(span.span_id, 16), False, TraceFlags(1))
    parent = (
        SpanContext(int(span.trace_id, 16), int(span.parent_id, 16), True, TraceFlags(1))
        if span.parent_id
        else None
    )
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=span.attributes,
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        status=Status(_STATUSES.get(span.status, StatusCode.UNSET), span.status_message or None),
        start_time=span.start_ns,
        end_time=span.end_ns,
    )


class OtlpRelay:
    """A bounded queue of spans and the task that exports them (``run()``)."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queued: int = 20_000,
        batch: int = 512,
        linger_s: float = 1.0,
    ) -> None:
        self._exporter = exporter
        self._queue: asyncio.Queue[list[tuple[SpanRecord, str]]] = asyncio.Queue()
        self._queued = 0
        self._max_queued = max_queued
        self._batch = batch
        self._linger_s = linger_s
        """How long the first spans of a batch wait for more: a trickle of small messages
        goes out as one request a second, not one each (a request costs more than its spans)."""
        self._pending: list[tuple[SpanRecord, str]] = []
        self._resources: dict[str, Resource] = {}
        self.exported = 0
        self.dropped = 0

    @classmethod
    def from_environment(cls) -> OtlpRelay | None:
        """A relay to the collector ``OTEL_EXPORTER_OTLP_ENDPOINT`` names; None if unset."""
        if otlp_endpoint() is None:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter())

    def put(self, rows: list[tuple[SpanRecord, str]]) -> None:
        """Queue spans (with the identity that sent each); past the bound, they are dropped."""
        if self._queued + len(rows) > self._max_queued:
            self.dropped += len(rows)
            if self.dropped == len(rows) or self.dropped % 10_000 < len(rows):
                logger.warning("the OTLP collector is behind: %d spans dropped so far", self.dropped)
            return
        self._queued += len(rows)
        self._queue.put_nowait(rows)

    async def run(self) -> None:
        """Export what is queued, a batch at a time (``batch`` spans, or what ``linger_s``
        gathered), off the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            self._take(await self._queue.get())
            deadline = loop.time() + self._linger_s
            while len(self._pending) < self._batch and (left := deadline - loop.time()) > 0:
                # Not asyncio.wait_for: cancelled just as its get completed, it did not
                # return on Python 3.11, and close() waited on it for ever.
                try:
                    async with asyncio.timeout(left):
                        rows = await self._queue.get()
                except TimeoutError:
                    break
                self._take(rows)
            rows, self._pending = self._pending, []
            await self._export(rows)

    def _take(self, rows: list[tuple[SpanRecord, str]]) -> None:
        self._queued -= len(rows)
        self._pending.extend(rows)

    async def _export(self, rows: list[tuple[SpanRecord, str]]) -> None:
        spans = [readable(span, self._resource(identity)) for span, identity in rows]
        result = await asyncio.to_thread(self._exporter.export, spans)
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.dropped += len(spans)
            logger.warning("the OTLP collector refused %d spans", len(spans))

    def _resource(self, identity: str) -> Resource:
        if identity not in self._resources:
            self._resources[identity] = resource_of(identity)
        return self._resources[identity]

    async def close(self, running: asyncio.Task[Any]) -> None:
        """Export what is still queued, stop ``running``, shut the exporter down."""
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        while not self._queue.empty():
            self._take(self._queue.get_nowait())
        rest, self._pending = self._pending, []
        if rest:
            with contextlib.suppress(Exception):
                await self._export(rest)
        await asyncio.to_thread(self._exporter.shutdown)

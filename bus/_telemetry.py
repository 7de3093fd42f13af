"""Where a process's spans go: over NATS to the supervisor, which stores and exports them.

``configure()`` installs the process's tracer provider once it is connected. Each batch of
spans is published on the process's own ``corral.spans.<identity>`` subject (the only one
its credentials allow, so no process can write spans in another's name), captured by
``CORRAL_SPANS``. The supervisor's ``SpanWriter`` stores them in PostgreSQL for ``corral
trace`` and the console (no collector needed) and, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
set, hands them to its export process, the one exporter over OTLP/HTTP, so an agent holds
neither the collector's address nor its credentials.

Spans are batched off the event loop (``BatchSpanProcessor``'s thread); a span that
cannot be delivered is dropped and counted, never retried on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from corral.bus import spans, subjects

if TYPE_CHECKING:
    from nats.js import JetStreamContext

logger = logging.getLogger(__name__)

_BATCH_BYTES = 512 * 1024
"""At most this much of spans in one message (the server's ``max_payload`` is 1 MiB)."""


# OTLP's ids: 16 and 8 bytes, never all zero (which means none).
_TraceId = Annotated[str, msgspec.Meta(pattern="^(?!0{32})[0-9a-f]{32}$")]
_SpanId = Annotated[str, msgspec.Meta(pattern="^(?!0{16})[0-9a-f]{16}$")]
_ParentId = Annotated[str, msgspec.Meta(pattern="^((?!0{16})[0-9a-f]{16})?$")]
_Nanoseconds = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One finished span as the store keeps it. Any process may send anything on its own
    spans subject: what could not be stored or exported (an id that is not OTLP's, a time
    past what a timestamp holds) does not decode, so its message is dead-lettered, and the
    spans of the other processes are not held up by it."""

    trace_id: _TraceId
    span_id: _SpanId
    parent_id: _ParentId
    name: str
    kind: str
    start_ns: _Nanoseconds
    end_ns: _Nanoseconds
    status: str
    status_message: str
    attributes: dict[str, Any]
    service: str


class SpanBatch(msgspec.Struct, frozen=True, kw_only=True, tag="spans"):
    """Spans of one process, published on its own ``corral.spans.<identity>``."""

    v: int = 1
    spans: list[SpanRecord]


def record_of(span: ReadableSpan) -> SpanRecord:
    context = span.context
    parent = span.parent
    return SpanRecord(
        trace_id=f"{context.trace_id:032x}" if context else "",
        span_id=f"{context.span_id:016x}" if context else "",
        parent_id=f"{parent.span_id:016x}" if parent else "",
        name=span.name,
        kind=span.kind.name.lower(),
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status=span.status.status_code.name.lower(),
        status_message=span.status.description or "",
        attributes=dict(span.attributes or {}),
        service=str(span.resource.attributes.get("service.name", "")),
    )


class _ConversationIds(RandomIdGenerator):
    """A root span of a conversation takes the conversation's trace id (``spans``)."""

    def generate_trace_id(self) -> int:
        return spans.forced_trace_id() or super().generate_trace_id()


class NatsSpanExporter(SpanExporter):
    """Publishes finished spans on ``corral.spans.<identity>``, from the batching thread,
    through the process's own connection (on its event loop)."""

    def __init__(self, js: JetStreamContext, identity: str, loop: asyncio.AbstractEventLoop) -> None:
        self._js = js
        self._subject = subjects.spans(identity)
        self._loop = loop
        self._encoder = msgspec.json.Encoder()
        self.dropped = 0

    def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        chunks: list[list[SpanRecord]] = [[]]
        size = 0
        for span in batch:
            record = record_of(span)
            length = len(self._encoder.encode(record))
            if length > _BATCH_BYTES:
                self.dropped += 1
                continue
            if size + length > _BATCH_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(record)
            size += length
        result = SpanExportResult.SUCCESS
        for chunk in chunks:
            if chunk and not self._publish(self._encoder.encode(SpanBatch(spans=chunk))):
                self.dropped += len(chunk)
                result = SpanExportResult.FAILURE
        return result

    def _publish(self, data: bytes) -> bool:
        if self._loop.is_closed():
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._js.publish(self._subject, data, timeout=5), self._loop
            )
            future.result(timeout=10)
        except Exception as exc:
            logger.warning("could not store %d bytes of spans: %s", len(data), exc)
            return False
        return True

    def shutdown(self) -> None:
        pass


_provider: TracerProvider | None = None


def otlp_endpoint() -> str | None:
    """Where OTLP export goes, if the operator set it."""
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def configure(js: JetStreamContext, identity: str) -> TracerProvider:
    """Install this process's tracer provider (once): its spans go out on its own spans
    subject. Must be called on the running event loop of the connection."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=resource_of(identity), id_generator=_ConversationIds())
    exporter = NatsSpanExporter(js, identity, asyncio.get_running_loop())
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def resource_of(identity: str) -> Resource:
    """What a process's spans say of it: ``corral-<identity>``, in corral's namespace."""
    return Resource.create({"service.name": f"corral-{identity}", "service.namespace": "corral"})


async def flush() -> None:
    """Deliver the spans still batched (before the connection closes); the event loop stays
    free meanwhile, as the store's exporter needs it."""
    provider = _provider
    if provider is not None:
        await asyncio.to_thread(provider.force_flush, 10_000)

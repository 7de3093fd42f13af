"""The OTLP export process: span messages on standard input, out to an OTLP/HTTP collector.

    python -m corral.supervisor.store._otlp_export      # started by the supervisor (OtlpRelay)

Its input is what the supervisor's ``SpanWriter`` stored, one frame per span message:
``FRAME`` (the sender's identity's length and the message's), the identity, the message
(a ``SpanBatch`` as the sender published it on its own spans subject). Each span goes to
OpenTelemetry's own ``BatchSpanProcessor`` and ``OTLPSpanExporter`` as the process that
sent it (``service.name`` ``corral-<identity>``, whatever the span says of itself): the
SDK's batching, queue bound and exporter, configured by their environment variables
(``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``). At the end of its input (the supervisor closed
it, or died) it exports what it holds and exits, so it never outlives the supervisor.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import struct
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

import msgspec
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from corral.bus import DECODE_ERRORS
from corral.bus._telemetry import SpanBatch, SpanRecord, resource_of
from corral.bus.spans import otel_attributes

logger = logging.getLogger("corral.otlp_export")

FRAME = struct.Struct(">HI")
"""A frame's head: the identity's length and the message's, in bytes."""
FINISH_S = 8.0
"""How long it may take, once its input ended, to export what it holds (the supervisor is
given 10 s to stop; an export past this is dropped, not waited for)."""
SCHEDULE_DELAY_MS = 1000
"""How long spans wait for more before a request, unless ``OTEL_BSP_SCHEDULE_DELAY`` says."""
MAX_QUEUE_SIZE = 20_000
"""Spans held for the collector before more are dropped, unless ``OTEL_BSP_MAX_QUEUE_SIZE``
says (the SDK's own default, 2,048, is about a second of a busy stack's spans)."""

_KINDS = {kind.name.lower(): kind for kind in SpanKind}
_STATUSES = {code.name.lower(): code for code in StatusCode}
_decoder = msgspec.json.Decoder(SpanBatch)


def frame(identity: str, data: bytes) -> bytes:
    """One span message of ``identity`` as this process reads it."""
    name = identity.encode()
    return FRAME.pack(len(name), len(data)) + name + data


def frames(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """The (identity, message) frames of ``stream`` until it ends (a cut last frame is
    dropped: its writer died while writing it)."""
    while len(head := stream.read(FRAME.size)) == FRAME.size:
        name_length, data_length = FRAME.unpack(head)
        name, data = stream.read(name_length), stream.read(data_length)
        if len(name) < name_length or len(data) < data_length:
            return
        yield name.decode(errors="replace"), data


def readable(span: SpanRecord, resource: Resource) -> ReadableSpan:
    """``span`` as the SDK's processors and exporters take one."""
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
        # As every process makes its spans' (a map, a list of lists, a list nested past
        # protobuf's depth: as JSON), so that what another process sent cannot fail the
        # request that carries everyone's spans.
        attributes=otel_attributes(span.attributes),
        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        status=Status(_STATUSES.get(span.status, StatusCode.UNSET), span.status_message or None),
        start_time=span.start_ns,
        end_time=span.end_ns,
    )


@functools.cache
def _resource(identity: str) -> Resource:
    return resource_of(identity)


def export(stream: BinaryIO) -> int:
    """Export every span of ``stream``'s frames; the spans given to the exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    delay = None if "OTEL_BSP_SCHEDULE_DELAY" in os.environ else SCHEDULE_DELAY_MS
    queue = None if "OTEL_BSP_MAX_QUEUE_SIZE" in os.environ else MAX_QUEUE_SIZE
    processor = BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=queue, schedule_delay_millis=delay)
    given = 0
    try:
        for identity, data in frames(stream):
            try:
                batch = _decoder.decode(data)
                resource = _resource(identity)
                for span in batch.spans:
                    processor.on_end(readable(span, resource))
                    given += 1
            except (*DECODE_ERRORS, ValueError) as exc:  # stored, so it decoded once
                logger.warning("a span message of %s cannot be exported: %s", identity, exc)
    finally:
        # What is queued goes out first, unless the collector takes longer than FINISH_S.
        deadline = threading.Timer(FINISH_S, _give_up, args=(given,))
        deadline.daemon = True
        deadline.start()
        processor.shutdown()  # type: ignore[no-untyped-call]
        deadline.cancel()
    return given


def _give_up(given: int) -> None:
    logger.warning(
        "the collector took over %.0f s to take the last spans; %d were given, some are lost", FINISH_S, given
    )
    logging.shutdown()
    os._exit(1)


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: this process stops at the end
    # of its input instead, once the supervisor has closed it, with nothing lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    export(sys.stdin.buffer)


if __name__ == "__main__":
    main()

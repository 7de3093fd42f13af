"""The OTLP relay's batching: what arrives as many small messages leaves as few requests,
each span once, and nothing queued or gathered is lost when it closes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from corral.bus._telemetry import SpanRecord
from corral.supervisor.store._otlp_relay import OtlpRelay
from tests.conftest import eventually


class _CountingExporter(InMemorySpanExporter):
    """The SDK's in-memory exporter, counting its requests."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.requests += 1
        return super().export(spans)


def _rows(first: int, count: int, identity: str = "router") -> list[tuple[SpanRecord, str]]:
    return [
        (
            SpanRecord(
                trace_id="ab" * 16,
                span_id=f"{first + n + 1:016x}",
                parent_id="",
                name="chat support",
                kind="client",
                start_ns=1_000,
                end_ns=2_000,
                status="unset",
                status_message="",
                attributes={"gen_ai.operation.name": "chat"},
                service="",
            ),
            identity,
        )
        for n in range(count)
    ]


async def test_a_trickle_of_small_messages_leaves_as_one_request() -> None:
    exporter = _CountingExporter()
    relay = OtlpRelay(exporter, linger_s=30.0, batch=100)
    for n in range(10):
        relay.put(_rows(10 * n, 10, identity=f"agent-{n % 2}"))
    running = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.exported == 100, message="the batch exported")
        assert exporter.requests == 1
        services = {span.resource.attributes["service.name"] for span in exporter.get_finished_spans()}
        assert services == {"corral-agent-0", "corral-agent-1"}
    finally:
        await relay.close(running)


async def test_closing_exports_what_was_gathered_and_what_was_queued() -> None:
    exporter = _CountingExporter()
    relay = OtlpRelay(exporter, linger_s=30.0, batch=1_000)
    running = asyncio.create_task(relay.run())
    relay.put(_rows(0, 5))
    # The relay has taken the first spans and lingers for more when these arrive.
    await eventually(lambda: relay._pending, message="the first spans gathered")
    relay.put(_rows(5, 7))
    await relay.close(running)
    ids = sorted(span.context.span_id for span in exporter.get_finished_spans())
    assert ids == list(range(1, 13))
    assert relay.exported == 12 and relay.dropped == 0

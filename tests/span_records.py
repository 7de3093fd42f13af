"""Span messages as a process publishes them on its own spans subject, for the tests of what
the span store and the OTLP export make of them (a hostile process's included)."""

from __future__ import annotations

from typing import Any

import msgspec

from corral.bus._telemetry import SpanBatch, SpanRecord


def span_record(span_id: str, **changes: Any) -> SpanRecord:
    """A well-formed finished span; ``changes`` make it anything else."""
    span = SpanRecord(
        trace_id="ab" * 16,
        span_id=span_id,
        parent_id="",
        name="invoke_agent triage",
        kind="internal",
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_000_100_000_000,
        status="unset",
        status_message="",
        attributes={},
        service="",
    )
    return msgspec.structs.replace(span, **changes)


def span_message(*spans: SpanRecord) -> bytes:
    """One span message holding ``spans``."""
    return msgspec.json.encode(SpanBatch(spans=list(spans)))

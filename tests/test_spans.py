"""The span layer (corral.bus.spans) in one process, with the SDK's in-memory exporter: a
conversation's trace id in every turn, a foreign trace kept as a link, and message content
only when the operator opts in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from corral.bus import HandoffProposed, ToolCall, ToolResult, spans, use_traceparent
from corral.bus._telemetry import _ConversationIds


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = TracerProvider(id_generator=_ConversationIds())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    return memory


@pytest.fixture
def finished(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    spans.capture_content.cache_clear()
    yield exporter
    spans.capture_content.cache_clear()


def _call() -> ToolCall:
    return ToolCall(
        conversation="c-1", step=2, index=1, agent="payments", tool="refund", arguments={"order": "42"}
    )


def test_every_root_span_of_a_conversation_is_in_its_trace(finished: InMemorySpanExporter) -> None:
    with spans.turn("c-1", event="start", client="web"):
        carried = spans.traceparent("c-1")
    with spans.turn("c-1", event="message", client="web"), spans.decision("c-1", "message"):
        pass
    with spans.turn("c-2", event="start", client="web"):
        pass
    # In another process: the carried context parents the next span.
    with use_traceparent(carried), spans.decision("c-1", "start") as decided:
        pass
    got = finished.get_finished_spans()
    by_conversation = {s.attributes["gen_ai.conversation.id"]: set() for s in got}  # type: ignore[index]
    for span in got:
        by_conversation[span.attributes["gen_ai.conversation.id"]].add(span.context.trace_id)  # type: ignore[index]
    assert by_conversation == {"c-1": {spans.trace_id_of("c-1")}, "c-2": {spans.trace_id_of("c-2")}}
    assert decided.parent is not None and decided.parent.span_id == int(carried.split("-")[2], 16)  # type: ignore[attr-defined]


def test_a_foreign_trace_is_a_link_and_the_conversation_keeps_its_own(finished: InMemorySpanExporter) -> None:
    foreign = f"00-{'ab' * 16}-{'cd' * 8}-01"
    with use_traceparent(foreign), spans.decision("c-3", "start"):
        pass
    (span,) = finished.get_finished_spans()
    assert span.context.trace_id == spans.trace_id_of("c-3") and span.parent is None
    assert [link.context.trace_id for link in span.links] == [int("ab" * 16, 16)]


def _content_spans(finished: InMemorySpanExporter) -> dict[str, dict[str, object]]:
    proposed = HandoffProposed(
        conversation="c-1", step=1, agent="triage", target="payments", confidence=0.9, payload={"order": "42"}
    )
    with spans.agent_step("c-1", "payments", step=2, attempt=1, tier="fast"):
        with spans.tool_call(_call(), call_id="call_1") as span:
            spans.tool_result(
                span,
                ToolResult(
                    conversation="c-1", step=2, index=1, tool="refund", status="ok", result={"refunded": 42}
                ),
            )
        with spans.handoff("c-1", proposed):
            pass
    return {s.name: dict(s.attributes or {}) for s in finished.get_finished_spans()}


def test_content_is_not_recorded_by_default(
    finished: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    got = _content_spans(finished)
    tool = got["execute_tool refund"]
    assert tool["gen_ai.tool.call.id"] == "call_1" and tool["corral.decision"] == "ok"
    assert tool["corral.idempotency_key"] == "c-1:2:1" and tool["corral.dry_run"] is False
    assert got["execute_tool transfer_to_payments"]["corral.handoff.payload_keys"] == ("order",)
    for attributes in got.values():
        assert not spans.CONTENT_ATTRIBUTES & attributes.keys()


@pytest.mark.parametrize("value", ["SPAN_ONLY", "span_and_event", "true"])
def test_content_is_recorded_when_opted_in(
    finished: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", value)
    got = _content_spans(finished)
    assert got["execute_tool refund"][spans.TOOL_ARGUMENTS] == '{"order": "42"}'
    assert got["execute_tool refund"][spans.TOOL_RESULT] == '{"refunded": 42}'
    assert got["execute_tool transfer_to_payments"][spans.HANDOFF_PAYLOAD] == '{"order": "42"}'

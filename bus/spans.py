"""corral's spans: the one layer that opens them, after OpenTelemetry's GenAI conventions.

Every process opens its spans here and nowhere else; the code around them only adds
attributes (``annotate``). What each span is:

* ``invoke_workflow conversation``: a customer's turn as it enters (the API, a client);
* ``supervisor.decide {event}``: the supervisor's decision on what arrived;
* ``invoke_agent {agent}``: one step of an agent;
* ``chat {model}``: one attempt at a model (the model gateway);
* ``execute_tool {tool}``: one tool call (the agent's side, with the model's call id);
  a handoff is ``execute_tool transfer_to_{target}``, with the target and the confidence;
* ``policy {tool}``: the tool gateway's policy decision on a call.

One trace per conversation: a span opened with no parent (the first turn, a later turn,
a recovery) takes the trace id derived from the conversation's id (``trace_id_of``), so
every turn of a conversation, in every process, is one trace; the parent of a span in
another process comes from the ``traceparent`` header the bus carries.

Message content (prompts, answers, tool arguments and results, handoff payloads) is
recorded only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for it on
spans (``SPAN_ONLY`` or ``SPAN_AND_EVENT``, as opentelemetry-util-genai reads it; ``true``
means ``SPAN_ONLY``). With ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``
only the newest attribute names are written; without it, ``gen_ai.system`` is written
beside ``gen_ai.provider.name`` for backends that read the older name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import cache
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from corral.bus._messages import HandoffProposed, ToolCall, ToolResult
from corral.bus._trace import current_traceparent

CONVERSATION = gen_ai.GEN_AI_CONVERSATION_ID
OPERATION = gen_ai.GEN_AI_OPERATION_NAME
AGENT = gen_ai.GEN_AI_AGENT_NAME
TOOL = gen_ai.GEN_AI_TOOL_NAME
TOOL_CALL_ID = gen_ai.GEN_AI_TOOL_CALL_ID
PROVIDER = gen_ai.GEN_AI_PROVIDER_NAME
REQUEST_MODEL = gen_ai.GEN_AI_REQUEST_MODEL
RESPONSE_MODEL = gen_ai.GEN_AI_RESPONSE_MODEL
INPUT_TOKENS = gen_ai.GEN_AI_USAGE_INPUT_TOKENS
OUTPUT_TOKENS = gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
INPUT_MESSAGES = gen_ai.GEN_AI_INPUT_MESSAGES
OUTPUT_MESSAGES = gen_ai.GEN_AI_OUTPUT_MESSAGES
TOOL_ARGUMENTS = gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS
TOOL_RESULT = gen_ai.GEN_AI_TOOL_CALL_RESULT
HANDOFF_PAYLOAD = "corral.handoff.payload"
CONTENT_ATTRIBUTES = frozenset(
    {INPUT_MESSAGES, OUTPUT_MESSAGES, TOOL_ARGUMENTS, TOOL_RESULT, HANDOFF_PAYLOAD}
)
"""The attributes that carry message content: only ever set when content is opted in."""

_tracer = trace.get_tracer("corral")
_root_trace: ContextVar[int | None] = ContextVar("corral_root_trace", default=None)


def trace_id_of(conversation: str) -> int:
    """The trace id of ``conversation``: the same in every process, for every turn."""
    digest = hashlib.blake2b(conversation.encode(), digest_size=16, person=b"corral.trace").digest()
    return int.from_bytes(digest, "big") or 1


def traceparent(conversation: str) -> str:
    """The traceparent to send now: the current span's, else one in the conversation's
    trace (when spans are not made, a message still carries its conversation's trace)."""
    return current_traceparent() or f"00-{trace_id_of(conversation):032x}-{secrets.token_hex(8)}-01"


def forced_trace_id() -> int | None:
    """The trace id a root span opened now must take (``telemetry``'s id generator asks)."""
    return _root_trace.get()


@cache
def capture_content() -> bool:
    """Whether the operator opted in to message content on spans."""
    from opentelemetry.util.genai.types import ContentCapturingMode
    from opentelemetry.util.genai.utils import get_content_capturing_mode

    value = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower()
    if value in {"true", "1", "yes"}:
        return True
    return get_content_capturing_mode() in {
        ContentCapturingMode.SPAN_ONLY,
        ContentCapturingMode.SPAN_AND_EVENT,
    }


@cache
def _latest_only() -> bool:
    opt_in = os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
    return "gen_ai_latest_experimental" in {part.strip() for part in opt_in.split(",")}


def _parent(conversation: str) -> tuple[Context | None, list[trace.Link]]:
    """What parents a span of ``conversation``: the current span (None), else the
    traceparent the bus carried in, else nothing (an empty context: a root, which takes the
    conversation's trace id). A carried context of another trace (a client that traces on
    its own) becomes a link: the conversation's trace stays one."""
    if trace.get_current_span().get_span_context().is_valid:
        return None, []
    remote = _carried()
    if remote is None:
        return Context(), []
    if remote.trace_id != trace_id_of(conversation):
        return Context(), [trace.Link(remote)]
    return trace.set_span_in_context(NonRecordingSpan(remote), Context()), []


def _carried() -> SpanContext | None:
    carried = current_traceparent()
    if carried is None:
        return None
    parts = carried.split("-")
    try:
        remote = SpanContext(
            trace_id=int(parts[1], 16),
            span_id=int(parts[2], 16),
            is_remote=True,
            trace_flags=TraceFlags(int(parts[3], 16)),
        )
    except (ValueError, IndexError):
        return None
    return remote if remote.is_valid else None


@contextlib.contextmanager
def _span(
    name: str, conversation: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[Span]:
    attributes[CONVERSATION] = conversation
    parent, links = _parent(conversation)
    root = parent is not None and not _valid(parent)
    token = _root_trace.set(trace_id_of(conversation)) if root else None
    try:
        span = _tracer.start_span(
            name, context=parent, kind=kind, attributes=otel_attributes(attributes), links=links
        )
    finally:
        if token is not None:
            _root_trace.reset(token)
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


def _valid(context: Context) -> bool:
    return trace.get_current_span(context).get_span_context().is_valid


def otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OpenTelemetry takes: no None, lists of one type, the rest as JSON."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
        else:
            out[key] = json.dumps(value, default=str, ensure_ascii=False)
    return out


def annotate(span: Span | None = None, /, **attributes: Any) -> None:
    """Add ``corral.<name>`` attributes to ``span`` (the current one if None). The one
    thing code outside this module does to spans."""
    target = span or trace.get_current_span()
    if target.is_recording():
        target.set_attributes(otel_attributes({f"corral.{key}": value for key, value in attributes.items()}))


def content(span: Span, attribute: str, value: Any) -> None:
    """Set a content attribute, only if the operator opted in to content."""
    if attribute in CONTENT_ATTRIBUTES and capture_content() and span.is_recording():
        span.set_attributes(otel_attributes({attribute: value}))


def failed(span: Span, reason: str, error_type: str = "corral.failed") -> None:
    """Mark ``span`` as failed, with why."""
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, reason[:512]))


# --- the spans ------------------------------------------------------------------------------


def turn(
    conversation: str, *, event: str, client: str, dry_run: bool = False
) -> contextlib.AbstractContextManager[Span]:
    """A customer's turn entering corral: ``event`` is ``start`` or ``message``."""
    return _span(
        "invoke_workflow conversation",
        conversation,
        {
            OPERATION: "invoke_workflow",
            gen_ai.GEN_AI_WORKFLOW_NAME: "conversation",
            "corral.event": event,
            "corral.client": client,
            "corral.dry_run": dry_run,
        },
        SpanKind.PRODUCER,
    )


def decision(conversation: str, event: str, *, agent: str = "") -> contextlib.AbstractContextManager[Span]:
    """The supervisor deciding on ``event`` (a start, a handoff, a reply, a verdict...)."""
    return _span(
        f"supervisor.decide {event}", conversation, {"corral.event": event, "corral.agent": agent or None}
    )


def agent_step(
    conversation: str, agent: str, *, step: int, attempt: int, tier: str
) -> contextlib.AbstractContextManager[Span]:
    """One step of ``agent`` (its first model tier is ``tier``)."""
    return _span(
        f"invoke_agent {agent}",
        conversation,
        {
            OPERATION: "invoke_agent",
            AGENT: agent,
            "corral.step": step,
            "corral.attempt": attempt,
            "corral.tier": tier,
        },
        SpanKind.CONSUMER,
    )


def chat_attempts(
    conversation: str,
    attempts: Sequence[Any],
    *,
    agent: str,
    tier: str,
    started_ns: int,
    ended_ns: int,
    usage_of_last: Mapping[str, Any] | None = None,
    messages: Any = None,
    answer: Any = None,
) -> None:
    """One ``chat {model}`` span per attempt the gateway made for one call (litellm retries
    and falls back inside one call; each attempt says its model, outcome and seconds). The
    attempts are laid end to end back from ``ended_ns``; the last (the answer, when the
    call succeeded) carries the usage and, if opted in, the content."""
    if not attempts:
        return
    end = ended_ns
    placed = []
    for attempt in reversed(attempts):
        start = max(started_ns, end - int(float(attempt.seconds) * 1e9))
        placed.append((attempt, start, end))
        end = start
    for number, (attempt, start, end) in enumerate(reversed(placed), 1):
        model = str(attempt.model)
        provider = model.split("/", 1)[0] if "/" in model else "openai"
        attributes: dict[str, Any] = {
            CONVERSATION: conversation,
            OPERATION: "chat",
            PROVIDER: provider,
            REQUEST_MODEL: model,
            AGENT: agent,
            "corral.tier": tier,
            "corral.attempt": number,
            "corral.outcome": attempt.outcome,
        }
        if not _latest_only():
            attributes[gen_ai.GEN_AI_SYSTEM] = provider
        last = number == len(placed)
        if last and usage_of_last:
            attributes.update(usage_of_last)
        parent, links = _parent(conversation)
        span = _tracer.start_span(
            f"chat {model}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=otel_attributes(attributes),
            links=links,
            start_time=start,
        )
        if attempt.outcome != "ok":
            failed(span, str(attempt.outcome), str(attempt.outcome))
        elif last:
            content(span, INPUT_MESSAGES, messages)
            content(span, OUTPUT_MESSAGES, answer)
        span.end(end_time=end)


def usage(span: Span, *, input_tokens: int, output_tokens: int, cost_usd: float, model: str = "") -> None:
    """What a model attempt (or a step's attempts together) used."""
    if span.is_recording():
        span.set_attributes(
            otel_attributes(
                {
                    INPUT_TOKENS: input_tokens,
                    OUTPUT_TOKENS: output_tokens,
                    "corral.cost_usd": cost_usd,
                    RESPONSE_MODEL: model or None,
                }
            )
        )


def add_usage(*, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
    """Add a model attempt's usage to the current span's (an agent's step adds up its
    attempts)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    had = getattr(span, "attributes", None) or {}
    usage(
        span,
        input_tokens=int(had.get(INPUT_TOKENS, 0)) + input_tokens,
        output_tokens=int(had.get(OUTPUT_TOKENS, 0)) + output_tokens,
        cost_usd=float(had.get("corral.cost_usd", 0.0)) + cost_usd,
    )


def tool_result(span: Span, result: ToolResult) -> None:
    """What the gateway decided on a call (and, if opted in, its result), on a call's span."""
    annotate(
        span,
        decision=result.status,
        policy_ids=result.policy_ids,
        approval_id=result.approval_id,
        dry_run=result.status == "simulated",
        replayed=result.replayed,
    )
    content(span, TOOL_RESULT, result.result)
    if result.status in {"error", "invalid", "stopped"}:
        failed(span, result.reason or result.status, f"corral.tool.{result.status}")


def idempotency_key(call: ToolCall) -> str:
    """A tool call's idempotency key, as the gateway's ledger keys it."""
    return f"{call.conversation}:{call.step}:{call.index}"


@contextlib.contextmanager
def tool_call(call: ToolCall, *, call_id: str) -> Iterator[Span]:
    """One tool call of an agent, as its model asked for it (``call_id``: the model's)."""
    with _span(
        f"execute_tool {call.tool}",
        call.conversation,
        {
            OPERATION: "execute_tool",
            TOOL: call.tool,
            TOOL_CALL_ID: call_id or None,
            AGENT: call.agent,
            gen_ai.GEN_AI_TOOL_TYPE: "function",
            "corral.idempotency_key": idempotency_key(call),
        },
    ) as span:
        content(span, TOOL_ARGUMENTS, call.arguments)
        yield span


@contextlib.contextmanager
def handoff(conversation: str, proposed: HandoffProposed) -> Iterator[Span]:
    """An agent handing the conversation to another (a transfer tool, as the conventions
    model one agent handing to another): the target, the confidence, the payload's fields
    (its values only if content is opted in)."""
    target = proposed.target
    with _span(
        f"execute_tool transfer_to_{target}",
        conversation,
        {
            OPERATION: "execute_tool",
            TOOL: f"transfer_to_{target}",
            AGENT: proposed.agent,
            gen_ai.GEN_AI_TOOL_TYPE: "function",
            "corral.handoff.target": target,
            "corral.confidence": proposed.confidence,
            "corral.handoff.payload_keys": sorted(proposed.payload),
        },
    ) as span:
        content(span, HANDOFF_PAYLOAD, proposed.payload)
        yield span


@contextlib.contextmanager
def policy(call: ToolCall, *, agent: str) -> Iterator[Span]:
    """The tool gateway deciding whether ``agent`` may apply a call (and applying it); the
    decision, the policies behind it and whether it was a dry run go on it (``tool_result``)."""
    with _span(
        f"policy {call.tool}",
        call.conversation,
        {TOOL: call.tool, AGENT: agent, "corral.idempotency_key": idempotency_key(call)},
        SpanKind.SERVER,
    ) as span:
        yield span

"""W3C trace context carried in message headers across every hop.

The consumer puts the incoming ``traceparent`` into a ContextVar for the duration of the
handler; ``publish`` copies it onto every outgoing message, so one trace id follows a
conversation through every process. Spans are opened in ``corral.bus.spans``; a span current in
the context is what is carried on.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

from opentelemetry import trace

TRACEPARENT = "traceparent"

_current: ContextVar[str | None] = ContextVar("corral_traceparent", default=None)


def new_traceparent() -> str:
    """A fresh sampled W3C traceparent (new trace id, new parent span id)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def current_traceparent() -> str | None:
    """The traceparent to carry on: the current span's (``corral.bus.spans``), else the
    message being handled's, if any."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    return _current.get()


def trace_id(traceparent: str | None) -> str | None:
    """The 32-hex trace id inside a traceparent, or None if it is malformed."""
    if traceparent is None:
        return None
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    return parts[1]


@contextlib.contextmanager
def use_traceparent(value: str | None) -> Iterator[None]:
    """Make ``value`` the current traceparent within the block."""
    token = _current.set(value)
    try:
        yield
    finally:
        _current.reset(token)


def traceparent_from(headers: Mapping[str, str] | None) -> str | None:
    """Extract a valid traceparent from message headers."""
    if not headers:
        return None
    value = headers.get(TRACEPARENT)
    return value if trace_id(value) else None

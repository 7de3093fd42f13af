"""Wire types of model calls: an agent asks the model gateway (``corral.from.<agent>.model``)
and the gateway answers with what the model really said, as it journaled it.

The chat shapes are OpenAI's, which every litellm provider maps to: an assistant turn may
carry ``tool_calls``; a ``tool`` turn answers one of them by ``tool_call_id``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

_Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
_Usd = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]

ChatRole = Literal["system", "user", "assistant", "tool"]

MAX_TOKENS_PER_RESPONSE = 10_000_000
"""More input or output tokens than this in one model answer is not a real figure."""
MAX_USD_PER_RESPONSE = 1_000.0
"""More dollars than this for one model answer is not a real figure."""


class ChatToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One function call in an assistant turn, as the model wrote it."""

    id: str
    name: str
    arguments: str = "{}"
    """JSON text, as the model wrote it: it may not parse, which the agent tells the model."""


class ChatTurn(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message of a model's history."""

    role: ChatRole
    content: str = ""
    tool_calls: list[ChatToolCall] = []
    """An assistant turn's function calls."""
    tool_call_id: str = ""
    """A tool turn's call, which it answers."""


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A function offered to the model: OpenAI's function format."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    """JSON Schema of the arguments."""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One model call the gateway made for a request (retries and fallbacks included)."""

    model: str
    outcome: str
    """``ok``, or what failed (``RateLimitError``, ``Timeout`` …)."""
    seconds: float = 0.0


class ModelCall(msgspec.Struct, frozen=True, kw_only=True, tag="model.call"):
    """An agent asks the model gateway for one completion.

    ``index`` numbers the step's model calls and tool calls together: with the conversation
    and the step it keys the journal, so the same call asked twice is answered once (from
    the journal the second time) and paid once.
    """

    v: int = 1
    conversation: str
    step: _Count
    index: _Count
    agent: str
    """The identity the body claims; the gateway trusts only the subject token."""
    tier: str
    messages: list[ChatTurn]
    again: bool = False
    """The step was delivered before (or resumed): the journal may hold this call's answer,
    so the gateway looks before it calls. (The tools offered are the gateway's to say: it
    builds them from the config, as the agent does.)"""


ModelStatus = Literal["ok", "stopped", "failed"]
"""``stopped``: a budget, a kill switch or the conversation's state says no more calls;
``failed``: the model could not answer (``retryable`` says whether a later try may)."""


class ModelAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="model.answer"):
    """The gateway's answer: the model's turn as journaled, and what it cost."""

    v: int = 1
    status: ModelStatus
    content: str = ""
    tool_calls: list[ChatToolCall] = []
    model: str = ""
    tier: str = ""
    input_tokens: _Count = 0
    output_tokens: _Count = 0
    cost_usd: _Usd = 0.0
    reason: str = ""
    retryable: bool = False
    replayed: bool = False
    """True when the journal answered: the model was asked on an earlier delivery."""
    attempts: list[Attempt] = []

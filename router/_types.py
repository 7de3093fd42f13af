"""The model interface corral's model gateway calls, independent of any provider.

Messages and tool calls are the bus's chat shapes (OpenAI's): what an agent sends the
gateway is what the gateway gives the model, and what the model answers is what the
gateway journals and returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from corral.bus import Attempt, ChatToolCall, ChatTurn, ToolSpec

SCRIPTED_PROVIDER = "scripted"
"""The provider name of corral's offline scripted model (``provider: scripted``)."""

ToolProtocol = Literal["auto", "native", "json_schema", "text"]
"""How a tier's models are offered tools: ``native`` function calling (``tools=``), JSON
structured output of one decision (``response_format``), or the text protocol (a JSON
object written in the answer). ``auto`` asks litellm what the model supports."""


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """One model call.

    Attributes:
        messages: The history, system prompt first.
        tools: The functions the model may call.
        agent: The calling agent (the scripted provider picks its rules by it).
        conversation: The conversation the call belongs to, for logs and traces.
    """

    messages: list[ChatTurn]
    agent: str
    tools: list[ToolSpec] = field(default_factory=list)
    conversation: str = ""


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A model's turn and what it cost."""

    content: str
    model: str
    tool_calls: list[ChatToolCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    """Every call made for this answer: failed retries and fallbacks, then the answer."""


@dataclass(frozen=True, kw_only=True)
class ModelPrice:
    """Dollars per million tokens, for a model litellm's price map does not know."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ModelTier:
    """A named model choice (``fast``, ``smart``) with fallbacks, as configured."""

    name: str
    model: str
    """A litellm model name, e.g. ``openai/gpt-4o-mini``, ``ollama/llama3``, ``scripted/support``."""
    fallbacks: list[str] = field(default_factory=list)
    api_base: str | None = None
    api_key: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 60.0
    """One call's timeout (each retry and fallback gets its own)."""
    retries: int = 2
    """Retries of one model on a rate limit, a 5xx or a timeout, before its fallbacks."""
    retry_backoff_s: float = 0.5
    """The first retry's pause; it doubles (with jitter), and a ``Retry-After`` wins."""
    cooldown_after: int = 3
    """Failures of one model, in a row, before it is left alone for ``cooldown_s``."""
    cooldown_s: float = 30.0
    tools: ToolProtocol = "auto"
    prices: dict[str, ModelPrice] = field(default_factory=dict)
    """Prices by model name, overriding litellm's map (for local models)."""
    via: Literal["litellm", "direct"] = "litellm"
    """``direct``: a scripted model answers without litellm."""


class Model(Protocol):
    """Anything that can answer a ``CompletionRequest``."""

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer one request.

        Raises:
            RouterError: when no answer could be had.
        """
        ...

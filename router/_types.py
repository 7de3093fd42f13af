"""The model interface corral's agents call, independent of any provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]

SCRIPTED_PROVIDER = "scripted"
"""The provider name of corral's offline scripted model (``provider: scripted``)."""


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """One message of a chat prompt."""

    role: Role
    content: str


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """One model call.

    Attributes:
        messages: The prompt.
        agent: The calling agent (the scripted provider picks its rules by it).
        conversation: The conversation the call belongs to, for logs and traces.
    """

    messages: list[ChatMessage]
    agent: str
    conversation: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A model's answer and what it cost."""

    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


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
    retries: int = 2
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

"""corral's model router: one ``complete()`` path over litellm, and the scripted provider."""

from router._litellm import SCRIPTED_PROVIDER, LiteLLMModel, model_for_tier, register_scripted
from router._scripted import ScriptedModel, ScriptRule, ScriptRules, load_rules
from router._types import ChatMessage, Completion, CompletionRequest, Model, ModelTier
from router.errors import RouterError, ScriptError

__all__ = [
    "SCRIPTED_PROVIDER",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "LiteLLMModel",
    "Model",
    "ModelTier",
    "RouterError",
    "ScriptError",
    "ScriptRule",
    "ScriptRules",
    "ScriptedModel",
    "load_rules",
    "model_for_tier",
    "register_scripted",
]

"""corral's model router: one ``complete()`` path over litellm, and the scripted provider."""

from corral.router._litellm import SCRIPTED_PROVIDER, LiteLLMModel, model_for_tier, register_scripted
from corral.router._scripted import ScriptedModel, ScriptRule, ScriptRules, load_rules
from corral.router._types import ChatMessage, Completion, CompletionRequest, Model, ModelTier
from corral.router.errors import RouterError, ScriptError

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

"""corral's model router: one ``complete()`` path over litellm, and the scripted provider.

The names load when first used (as ``corral``'s own do): reading a config's model tiers
does not load the scripted provider or litellm's adapter with them.
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from corral.router._litellm import LiteLLMModel, model_for_tier, register_scripted
    from corral.router._scripted import ScriptedModel, ScriptRule, ScriptRules, load_rules
    from corral.router._types import (
        SCRIPTED_PROVIDER,
        ChatMessage,
        Completion,
        CompletionRequest,
        Model,
        ModelTier,
    )
    from corral.router.errors import RouterError, ScriptError

_WHERE = {
    "SCRIPTED_PROVIDER": "corral.router._types",
    "LiteLLMModel": "corral.router._litellm",
    "model_for_tier": "corral.router._litellm",
    "register_scripted": "corral.router._litellm",
    "ScriptedModel": "corral.router._scripted",
    "ScriptRule": "corral.router._scripted",
    "ScriptRules": "corral.router._scripted",
    "load_rules": "corral.router._scripted",
    "ChatMessage": "corral.router._types",
    "Completion": "corral.router._types",
    "CompletionRequest": "corral.router._types",
    "Model": "corral.router._types",
    "ModelTier": "corral.router._types",
    "RouterError": "corral.router.errors",
    "ScriptError": "corral.router.errors",
}

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

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _WHERE)

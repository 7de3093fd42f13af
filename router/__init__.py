"""corral's model gateway: every model call of the team, on the trusted side, over one
``complete()`` path through litellm; and the scripted provider.

The names load when first used (as ``corral``'s own do): reading a config's model tiers
does not load the scripted provider or litellm's adapter with them.
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from corral.router._gateway import Admission, Ledger, ModelGateway
    from corral.router._litellm import LiteLLMModel, model_for_tier, register_scripted
    from corral.router._names import REPLY_TOOL, transfer_tool
    from corral.router._scripted import ScriptedModel, ScriptRule, ScriptRules, load_rules
    from corral.router._types import (
        SCRIPTED_PROVIDER,
        Completion,
        CompletionRequest,
        Model,
        ModelPrice,
        ModelTier,
        ToolProtocol,
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
    "Admission": "corral.router._gateway",
    "Ledger": "corral.router._gateway",
    "ModelGateway": "corral.router._gateway",
    "REPLY_TOOL": "corral.router._names",
    "transfer_tool": "corral.router._names",
    "ModelPrice": "corral.router._types",
    "ToolProtocol": "corral.router._types",
    "Completion": "corral.router._types",
    "CompletionRequest": "corral.router._types",
    "Model": "corral.router._types",
    "ModelTier": "corral.router._types",
    "RouterError": "corral.router.errors",
    "ScriptError": "corral.router.errors",
}

__all__ = [
    "REPLY_TOOL",
    "SCRIPTED_PROVIDER",
    "Admission",
    "Completion",
    "CompletionRequest",
    "Ledger",
    "LiteLLMModel",
    "Model",
    "ModelGateway",
    "ModelPrice",
    "ModelTier",
    "RouterError",
    "ScriptError",
    "ScriptRule",
    "ScriptRules",
    "ScriptedModel",
    "ToolProtocol",
    "load_rules",
    "model_for_tier",
    "register_scripted",
    "transfer_tool",
]

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _WHERE)

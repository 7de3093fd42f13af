"""Every real model call goes through litellm; ``scripted/…`` is a litellm custom provider.

litellm is imported lazily (it takes seconds) and only by processes that call models.
Before the import we set ``LITELLM_LOCAL_MODEL_COST_MAP`` so litellm uses its bundled
price map instead of fetching one from the internet: corral never reaches out on its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from corral.router._scripted import ScriptedModel, load_rules
from corral.router._types import SCRIPTED_PROVIDER, Completion, CompletionRequest, ModelTier
from corral.router.errors import RouterError, ScriptError

logger = logging.getLogger(__name__)

_litellm: ModuleType | None = None


def _load_litellm() -> ModuleType:
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        # Per-call overhead we do not need: no telemetry, no callbacks, no debug payloads.
        litellm.telemetry = False
        litellm.suppress_debug_info = True
        litellm.drop_params = True
        litellm.callbacks = []
        litellm.success_callback = []
        litellm.failure_callback = []
        logging.getLogger("LiteLLM").setLevel(logging.WARNING)
        _litellm = litellm
    return _litellm


def _make_handler(litellm: ModuleType, models: dict[str, ScriptedModel]) -> Any:
    """A litellm ``CustomLLM`` answering ``scripted/<name>`` from ``models[name]``."""
    from litellm import CustomLLM, ModelResponse  # type: ignore[attr-defined]

    class ScriptedHandler(CustomLLM):  # type: ignore[misc]
        async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
            model_name: str = kwargs["model"]
            rules_name = model_name.split("/", 1)[-1]
            scripted = models.get(rules_name)
            if scripted is None:
                raise ScriptError(f"no scripted rules named {rules_name!r}", model=model_name)
            params = kwargs.get("litellm_params") or {}
            metadata = params.get("metadata") or {}
            answer = await scripted.respond(
                str(metadata.get("corral_agent", "")),
                kwargs["messages"],
                str(metadata.get("corral_conversation", "")),
            )
            return self._response(kwargs, rules_name, answer.text, answer.rule.cost_usd)

        def _response(
            self, kwargs: dict[str, Any], rules_name: str, text: str, cost_usd: float
        ) -> ModelResponse:
            response: ModelResponse = kwargs["model_response"]
            response.choices[0].message.content = text  # type: ignore[union-attr]
            response.model = f"{SCRIPTED_PROVIDER}/{rules_name}"
            prompt_chars = sum(len(str(m.get("content", ""))) for m in kwargs["messages"])
            response.usage = litellm.Usage(  # type: ignore[attr-defined]
                prompt_tokens=prompt_chars // 4,
                completion_tokens=len(text) // 4,
                total_tokens=prompt_chars // 4 + len(text) // 4,
            )
            # The provider knows its price: litellm then skips its own cost lookups (about
            # half of what it spends per call).
            response._hidden_params["response_cost"] = cost_usd
            return response

    return ScriptedHandler()


def register_scripted(rules: dict[str, Path]) -> dict[str, ScriptedModel]:
    """Register the ``scripted`` provider with litellm for the given rules files.

    Args:
        rules: ``scripted/<name>`` model names (without the prefix) to rules files.

    Returns:
        The scripted models, by name, so callers can count their calls.
    """
    litellm = _load_litellm()
    models = {name: ScriptedModel(load_rules(path), name=f"scripted/{name}") for name, path in rules.items()}
    handler = _make_handler(litellm, models)
    # Known to litellm's model map (free): its per-call model-info lookups find them at once.
    litellm.register_model(
        {
            f"{SCRIPTED_PROVIDER}/{name}": {
                "litellm_provider": SCRIPTED_PROVIDER,
                "mode": "chat",
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
            }
            for name in models
        }
    )
    litellm.custom_provider_map = [  # type: ignore[attr-defined]
        item for item in litellm.custom_provider_map if item["provider"] != SCRIPTED_PROVIDER
    ] + [{"provider": SCRIPTED_PROVIDER, "custom_handler": handler}]
    from litellm.utils import custom_llm_setup

    custom_llm_setup()  # type: ignore[no-untyped-call]
    return models


class LiteLLMModel:
    """The ``Model`` interface over litellm, with retries and fallbacks for one tier.

    Args:
        tier: The tier to call.
    """

    def __init__(self, tier: ModelTier) -> None:
        self._tier = tier
        self._litellm = _load_litellm()

    async def complete(self, request: CompletionRequest) -> Completion:
        """Call the tier's model, then each fallback, until one answers.

        Raises:
            RouterError: when every model failed; ``retryable`` unless the last failure
                was a non-retryable one (bad request, missing rule).
        """
        litellm = self._litellm
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        attempt = 0
        last: Exception | None = None
        for model in [self._tier.model, *self._tier.fallbacks]:
            attempt += 1
            started = time.perf_counter()
            try:
                response = await litellm.acompletion(
                    model=model,
                    messages=messages,
                    api_base=self._tier.api_base,
                    api_key=self._tier.api_key,
                    temperature=self._tier.temperature,
                    max_tokens=self._tier.max_tokens,
                    timeout=self._tier.timeout_s,
                    num_retries=0 if model.startswith(f"{SCRIPTED_PROVIDER}/") else self._tier.retries,
                    metadata={
                        "corral_agent": request.agent,
                        "corral_conversation": request.conversation,
                    },
                )
            except Exception as exc:
                last = exc
                logger.warning("model %s failed for %s: %s", model, request.agent, _first_line(exc))
                continue
            return _from_response(litellm, response, model, time.perf_counter() - started)
        retryable = not _caused_by(last, ScriptError) and not isinstance(
            last, getattr(litellm, "BadRequestError", ())
        )
        raise RouterError(
            f"every model of tier {self._tier.name!r} failed: {_first_line(last)}",
            model=self._tier.model,
            attempt=attempt,
            retryable=retryable,
        ) from last


def _from_response(litellm: ModuleType, response: Any, model: str, elapsed_s: float) -> Completion:
    """Convert a litellm ``ModelResponse`` into a ``Completion``, once, at the edge."""
    text = response.choices[0].message.content or ""
    usage = getattr(response, "usage", None)
    # litellm prices every response once (the scripted provider prices its own); an
    # unknown price is not an error, the call still happened.
    cost = getattr(response, "_hidden_params", {}).get("response_cost")
    if cost is None:
        try:
            cost = litellm.completion_cost(completion_response=response)
        except Exception:
            cost = 0.0
    logger.debug("model %s answered in %.1f ms", model, elapsed_s * 1000)
    return Completion(
        text=text,
        model=str(getattr(response, "model", model) or model),
        input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        cost_usd=float(cost or 0.0),
    )


def _first_line(exc: BaseException | None) -> str:
    """litellm puts whole tracebacks into messages; keep the sentence that matters."""
    return str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else repr(exc)


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def model_for_tier(tier: ModelTier, scripted_rules: dict[str, Path]) -> LiteLLMModel | ScriptedModel:
    """The model of a tier: litellm-backed (registering the scripted provider if the tier
    needs it), or for ``via: direct`` the scripted model itself, without litellm."""
    if tier.via == "direct":
        name = tier.model.split("/", 1)[1]
        return ScriptedModel(load_rules(scripted_rules[name]), name=tier.model)
    if any(m.startswith(f"{SCRIPTED_PROVIDER}/") for m in [tier.model, *tier.fallbacks]):
        register_scripted(scripted_rules)
    return LiteLLMModel(tier)

"""Every real model call goes through litellm; ``scripted/…`` is a litellm custom provider.

litellm is imported lazily (it takes seconds) and only by processes that call models.
Before the import we set ``LITELLM_LOCAL_MODEL_COST_MAP`` so litellm uses its bundled
price map instead of fetching one from the internet: corral never reaches out on its own.

Resilience is litellm's ``Router``, one per tier, built once (``LiteLLMModel``):

- Deployments: one per model (the tier's ``model``, then each of ``fallbacks``), each its
  own model group, so ``fallbacks=[{model: [fallbacks…]}]`` tries them in order once the
  model's retries are spent (``Router.async_function_with_fallbacks``).
- Retries: ``RetryPolicy`` gives ``retries`` to ``RateLimitError``, ``Timeout``,
  ``InternalServerError`` and ``ServiceUnavailableError``, none to bad requests, auth and
  content-policy errors. Other errors (a 502, a refused connection, a 404) fall to the
  Router's ``num_retries`` and its ``should_retry_this_error``, which retries 5xx and
  connection failures and not other 4xx. A 400 still goes to the fallbacks (another
  model may take what this one refused). Scripted models are deterministic: a
  ``model_group_retry_policy`` of zeros sends their failures straight to the fallbacks.
- Backoff: the Router's ``_time_to_sleep_before_retry`` (``litellm._calculate_retry_after``)
  honours a ``Retry-After`` of up to 60 s as given, else doubles from litellm's
  ``INITIAL_RETRY_DELAY`` (0.5 s) with ``retry_after=tier.retry_backoff_s`` as the floor,
  capped at 8 s, plus up to 0.75 s of jitter. (litellm has no per-router base delay: a
  ``retry_backoff_s`` under 0.5 s still starts at 0.5 s, one above it is the floor of
  every pause rather than the first of a doubling series.)
- Timeouts: ``timeout=tier.timeout_s`` on each deployment: every retry and fallback is
  one call with its own timeout.
- Cooldowns: ``allowed_fails_policy`` (every failure kind at ``cooldown_after - 1``) and
  ``cooldown_time=tier.cooldown_s``: once a model has failed ``cooldown_after`` times
  within ``cooldown_s`` (litellm counts failures in a window that each failure renews,
  not strictly in a row) it is left alone for ``cooldown_s`` (or the 429's
  ``Retry-After``) and calls go straight to its fallbacks. The router-wide policy is what
  makes litellm cool down a model group of one deployment at all; its default refuses to.
- Attempts: a ``CustomLogger`` on litellm's async failure callbacks records each failed
  call (litellm awaits them inline, before the Router's next retry or fallback) into the
  recorder of the ``complete()`` that made it, found through a ``ContextVar``: concurrent
  calls and other tiers never see each other's attempts. The answering call comes from the
  response itself.

Prices in ``tier.prices`` are applied here from the response's usage; other models are
priced by litellm's map (``response_cost``, else ``completion_cost``), 0.0 when unknown.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from corral.bus import Attempt, ChatToolCall
from corral.router._protocols import WireProtocol, offer, read
from corral.router._scripted import ScriptedModel, load_rules
from corral.router._types import SCRIPTED_PROVIDER, Completion, CompletionRequest, ModelTier
from corral.router.errors import RouterError, ScriptError

logger = logging.getLogger(__name__)

_litellm: ModuleType | None = None


@dataclass(slots=True)
class _Recorder:
    """The calls one ``complete()`` made, in order, with the failures' exceptions."""

    attempts: list[Attempt] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


_RECORDER: ContextVar[_Recorder | None] = ContextVar("corral_router_attempts", default=None)


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
        # The Router logs each failed fallback chain with its traceback at ERROR; we raise a
        # RouterError carrying every attempt and log one line for it instead.
        logging.getLogger("LiteLLM Router").setLevel(logging.CRITICAL)
        litellm.logging_callback_manager.add_litellm_async_failure_callback(_attempt_logger(litellm))
        _litellm = litellm
    return _litellm


def _attempt_logger(litellm: ModuleType) -> Any:
    """The one failure callback: it writes to the calling ``complete()``'s recorder, if any."""
    from litellm.integrations.custom_logger import CustomLogger

    class AttemptLogger(CustomLogger):  # type: ignore[misc]
        async def async_log_failure_event(
            self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
        ) -> None:
            recorder = _RECORDER.get()
            if recorder is None:
                return
            exception = kwargs.get("exception")
            params = kwargs.get("litellm_params") or {}
            metadata = params.get("metadata") or {}
            model = str(metadata.get("model_group") or kwargs.get("model") or "")
            try:
                seconds = max((end_time - start_time).total_seconds(), 0.0)
            except (TypeError, AttributeError):
                seconds = 0.0
            # A scripted rule that is missing reaches us wrapped in litellm's APIConnectionError.
            outcome = "ScriptError" if _caused_by(exception, ScriptError) else type(exception).__name__
            recorder.attempts.append(Attempt(model=model, outcome=outcome, seconds=round(seconds, 6)))
            if isinstance(exception, BaseException):
                recorder.failures.append(exception)

    return AttemptLogger()


def _make_handler(litellm: ModuleType, models: dict[str, ScriptedModel]) -> Any:
    """A litellm ``CustomLLM`` answering ``scripted/<name>`` from ``models[name]``."""
    from litellm import CustomLLM, Message, ModelResponse  # type: ignore[attr-defined]

    class ScriptedHandler(CustomLLM):  # type: ignore[misc]
        async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
            model_name: str = kwargs["model"]
            rules_name = model_name.split("/", 1)[-1]
            scripted = models.get(rules_name)
            if scripted is None:
                raise ScriptError(f"no scripted rules named {rules_name!r}", model=model_name)
            params = kwargs.get("litellm_params") or {}
            metadata = params.get("metadata") or {}
            messages: list[dict[str, Any]] = kwargs["messages"]
            answer = await scripted.respond(
                str(metadata.get("corral_agent", "")), messages, str(metadata.get("corral_conversation", ""))
            )
            response: ModelResponse = kwargs["model_response"]
            choice = response.choices[0]
            # The OpenAI shape a real provider answers with; litellm keeps it as given.
            choice.message = Message(  # type: ignore[union-attr]
                content=answer.content or None,
                role="assistant",
                tool_calls=[
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in answer.tool_calls
                ]
                or None,
            )
            choice.finish_reason = "tool_calls" if answer.tool_calls else "stop"  # type: ignore[union-attr]
            response.model = f"{SCRIPTED_PROVIDER}/{rules_name}"
            prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4
            completion_tokens = answer.size // 4
            response.usage = litellm.Usage(  # type: ignore[attr-defined]
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            # The provider knows its price: litellm then skips its own cost lookups (about
            # half of what it spends per call).
            response._hidden_params["response_cost"] = answer.rule.cost_usd
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
                "supports_function_calling": True,
                "supports_tool_choice": True,
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


def _is_scripted(model: str) -> bool:
    return model.startswith(f"{SCRIPTED_PROVIDER}/")


def tool_protocol(tier: ModelTier, litellm: ModuleType) -> WireProtocol:
    """The protocol a tier's models are offered tools by: ``tier.tools``, or for ``auto``
    the best that every model of the tier supports (one request shape serves them all,
    fallbacks included): native function calling, else JSON structured output, else text.
    A model litellm's map does not know counts as native.
    """
    if tier.tools != "auto":
        return tier.tools
    models = [tier.model, *tier.fallbacks]

    def supports(check: Any, model: str) -> bool:
        if _is_scripted(model):
            return True
        try:
            litellm.get_model_info(model=model)
        except Exception:
            # A model litellm's map does not know (a local vLLM or Ollama model, an
            # OpenAI-compatible endpoint): nothing says it lacks function calling, and the
            # OpenAI API shape has it, so it is offered tools natively (`tools:` overrides).
            return True
        try:
            return bool(check(model=model))
        except Exception:
            return False

    if all(supports(litellm.supports_function_calling, m) for m in models):
        return "native"
    if all(supports(litellm.supports_response_schema, m) for m in models):
        return "json_schema"
    return "text"


class LiteLLMModel:
    """The ``Model`` interface over one litellm ``Router`` for a tier: retries, backoff,
    timeouts, fallbacks and cooldowns are litellm's (see the module's docstring).

    Args:
        tier: The tier to call.
    """

    def __init__(self, tier: ModelTier) -> None:
        litellm = _load_litellm()
        from litellm.router import Router
        from litellm.types.router import AllowedFailsPolicy, RetryPolicy

        self._tier = tier
        self._litellm = litellm
        self._unpriced: set[str] = set()
        for model in [tier.model, *tier.fallbacks]:
            if _is_scripted(model) or model in tier.prices:
                continue
            try:
                litellm.get_model_info(model=model)
            except Exception:
                # Its calls will count $0 toward the budgets: the operator must hear of it.
                logger.warning(
                    "model %s has no price in litellm's map: its calls count $0 toward budgets;"
                    " set models.%s.prices",
                    model,
                    tier.name,
                )
        self._protocol = tool_protocol(tier, litellm)
        models = [tier.model, *(m for m in tier.fallbacks if m != tier.model)]
        # Unique deployment ids: every Router's cooldown callback is global in litellm and
        # acts on any deployment id it knows; ids of our own keep tiers (and tests) apart.
        run = uuid.uuid4().hex[:8]
        self._model_by_id = {f"corral-{tier.name}-{i}-{run}": model for i, model in enumerate(models)}
        model_list = [
            {
                "model_name": model,
                "litellm_params": self._litellm_params(model),
                "model_info": {"id": deployment_id},
            }
            for deployment_id, model in self._model_by_id.items()
        ]
        retries = tier.retries
        allowed = max(tier.cooldown_after - 1, 0)
        no_retries = RetryPolicy(
            BadRequestErrorRetries=0,
            AuthenticationErrorRetries=0,
            TimeoutErrorRetries=0,
            RateLimitErrorRetries=0,
            ContentPolicyViolationErrorRetries=0,
            InternalServerErrorRetries=0,
            ServiceUnavailableErrorRetries=0,
            DefaultRetries=0,
        )
        self._router = Router(
            model_list=model_list,
            fallbacks=[{tier.model: models[1:]}] if len(models) > 1 else [],
            num_retries=retries,
            retry_after=tier.retry_backoff_s,  # type: ignore[arg-type]  # litellm takes any number
            retry_policy=RetryPolicy(
                BadRequestErrorRetries=0,
                AuthenticationErrorRetries=0,
                ContentPolicyViolationErrorRetries=0,
                TimeoutErrorRetries=retries,
                RateLimitErrorRetries=retries,
                InternalServerErrorRetries=retries,
                ServiceUnavailableErrorRetries=retries,
            ),
            model_group_retry_policy={m: no_retries for m in models if _is_scripted(m)},
            timeout=tier.timeout_s,
            allowed_fails=allowed,
            allowed_fails_policy=AllowedFailsPolicy(
                AuthenticationErrorAllowedFails=allowed,
                TimeoutErrorAllowedFails=allowed,
                RateLimitErrorAllowedFails=allowed,
                InternalServerErrorAllowedFails=allowed,
                ServiceUnavailableErrorAllowedFails=allowed,
                BadGatewayErrorAllowedFails=allowed,
                NotFoundErrorAllowedFails=allowed,
            ),
            cooldown_time=tier.cooldown_s,
        )

    def _litellm_params(self, model: str) -> dict[str, Any]:
        tier = self._tier
        params: dict[str, Any] = {"model": model, "timeout": tier.timeout_s}
        if not _is_scripted(model):
            # The Router's own retries are the only ones: none inside the provider's SDK.
            params["max_retries"] = 0
            if tier.api_base is not None:
                params["api_base"] = tier.api_base
            if tier.api_key is not None:
                params["api_key"] = tier.api_key
        if tier.temperature is not None:
            params["temperature"] = tier.temperature
        if tier.max_tokens is not None:
            params["max_tokens"] = tier.max_tokens
        return params

    @property
    def protocol(self) -> WireProtocol:
        """How this tier's models are offered tools."""
        return self._protocol

    def close(self) -> None:
        """Unhook the tier's Router from litellm's global callback lists (idempotent)."""
        self._router.discard()  # type: ignore[no-untyped-call]

    async def complete(self, request: CompletionRequest) -> Completion:
        """Call the tier's model (with retries), then each fallback, until one answers.

        Returns:
            The answer, with every call made for it in ``attempts``.

        Raises:
            RouterError: when every model failed; ``retryable`` unless every failure was
                a non-retryable one (bad request, auth, a missing scripted rule).
        """
        wire = offer(self._protocol, request.messages, request.tools)
        recorder = _Recorder()
        token = _RECORDER.set(recorder)
        started = time.perf_counter()
        try:
            response = await self._router.acompletion(
                model=self._tier.model,
                messages=wire.messages,  # type: ignore[arg-type]  # OpenAI's chat shape
                metadata={"corral_agent": request.agent, "corral_conversation": request.conversation},
                **wire.params,
            )
        except Exception as exc:
            raise self._failure(exc, recorder) from exc
        finally:
            _RECORDER.reset(token)
        return self._completion(response, recorder, time.perf_counter() - started)

    def _completion(self, response: Any, recorder: _Recorder, elapsed_s: float) -> Completion:
        """A litellm ``ModelResponse`` as a ``Completion``, once, at the edge."""
        hidden: dict[str, Any] = getattr(response, "_hidden_params", None) or {}
        model = self._model_by_id.get(str(hidden.get("model_id", "")), self._tier.model)
        message = response.choices[0].message
        content: str = message.content or ""
        calls = [
            ChatToolCall(id=c.id, name=c.function.name or "", arguments=c.function.arguments or "")
            for c in message.tool_calls or []
        ]
        if self._protocol != "native" and not calls:
            content, calls = read(content)
        usage = getattr(response, "usage", None)
        input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        seconds = getattr(response, "_response_ms", None)
        attempts = [
            *recorder.attempts,
            Attempt(model=model, outcome="ok", seconds=round(seconds / 1000 if seconds else elapsed_s, 6)),
        ]
        logger.debug("model %s answered after %d call(s) in %.1f ms", model, len(attempts), elapsed_s * 1000)
        return Completion(
            content=content,
            tool_calls=calls,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=self._cost(model, response, hidden, input_tokens, output_tokens),
            attempts=attempts,
        )

    def _cost(
        self, model: str, response: Any, hidden: dict[str, Any], input_tokens: int, output_tokens: int
    ) -> float:
        price = self._tier.prices.get(model)
        if price is not None:
            return (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1e6
        # litellm prices every response once (the scripted provider prices its own); an
        # unknown price is not an error, the call still happened.
        cost = hidden.get("response_cost")
        if cost is None and model not in self._unpriced:
            try:
                cost = self._litellm.completion_cost(completion_response=response)
            except Exception:  # litellm raises for models its map does not know
                self._unpriced.add(model)  # (a lookup that raises each time, not repeated)
        return float(cost or 0.0)

    def _failure(self, exc: Exception, recorder: _Recorder) -> RouterError:
        failures = recorder.failures or [exc]
        retryable = any(self._retryable(f) for f in failures)
        last = recorder.attempts[-1].model if recorder.attempts else self._tier.model
        logger.warning(
            "every model of tier %s failed after %d call(s): %s",
            self._tier.name,
            len(recorder.attempts),
            _first_line(exc),
        )
        return RouterError(
            f"every model of tier {self._tier.name!r} failed: {_first_line(exc)}",
            model=last,
            attempt=len(recorder.attempts),
            retryable=retryable,
            attempts=list(recorder.attempts),
        )

    def _retryable(self, exc: BaseException) -> bool:
        """Whether a later try may succeed: not for a missing scripted rule, a bad request,
        auth, or any other 4xx that litellm itself would not retry (all but 408, 409, 429)."""
        litellm = self._litellm
        final = (
            litellm.BadRequestError,
            litellm.AuthenticationError,
            litellm.PermissionDeniedError,
            litellm.NotFoundError,
            litellm.UnprocessableEntityError,
        )
        if isinstance(exc, final) or _caused_by(exc, ScriptError):
            return False
        status = getattr(exc, "status_code", None)
        return not (isinstance(status, int) and 400 <= status < 500 and not litellm._should_retry(status))


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
    if any(_is_scripted(m) for m in [tier.model, *tier.fallbacks]):
        register_scripted(scripted_rules)
    return LiteLLMModel(tier)

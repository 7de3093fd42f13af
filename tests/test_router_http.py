"""The router over litellm's real ``openai`` provider, against a scripted OpenAI-compatible
server on loopback: retries, Retry-After, fallbacks, timeouts, cooldowns, tool calls,
prices and the non-native tool protocols, as the server saw them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from corral.bus import ChatToolCall, ChatTurn, ToolSpec
from corral.router import CompletionRequest, LiteLLMModel, ModelPrice, ModelTier, RouterError
from tests.openai_server import OpenAIServer, answer, error, openai_server

__all__ = ["openai_server"]

pytestmark = pytest.mark.timeout(30)

LOOKUP = ToolSpec(
    name="lookup_order",
    description="Find an order.",
    parameters={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
REFUND = ToolSpec(
    name="refund",
    description="Refund an order.",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "amount_cents": {"type": "integer"}},
    },
)


def _tier(server: OpenAIServer, model: str = "openai/primary", **changes: Any) -> ModelTier:
    base = ModelTier(
        name="http",
        model=model,
        api_base=server.url,
        api_key="test",
        retries=1,
        retry_backoff_s=0.0,
        timeout_s=5.0,
        cooldown_after=5,
        cooldown_s=60.0,
        tools="native",
    )
    return replace(base, **changes)


@pytest.fixture
def models() -> Iterator[list[LiteLLMModel]]:
    """Models made by a test, unhooked from litellm's callback lists afterwards."""
    made: list[LiteLLMModel] = []
    yield made
    for model in made:
        model.close()


def _model(models: list[LiteLLMModel], tier: ModelTier) -> LiteLLMModel:
    model = LiteLLMModel(tier)
    models.append(model)
    return model


def _request(text: str = "hello", tools: list[ToolSpec] | None = None) -> CompletionRequest:
    return CompletionRequest(
        agent="triage",
        messages=[ChatTurn(role="system", content="You help."), ChatTurn(role="user", content=text)],
        tools=list(tools or []),
    )


def _outcomes(attempts: list[Any]) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in attempts]


async def test_a_rate_limit_is_retried_after_the_servers_retry_after(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    # 2 s: more than litellm's own first pause can be (0.5 s and up to 0.75 s of jitter).
    openai_server.script("primary", error(429, "slow down", retry_after="2"), answer("hi there"))
    model = _model(models, _tier(openai_server))
    completion = await model.complete(_request())
    assert completion.content == "hi there"
    first, second = openai_server.requests("primary")
    assert second.at - first.at >= 1.9
    assert _outcomes(completion.attempts) == [("openai/primary", "RateLimitError"), ("openai/primary", "ok")]
    assert completion.model == "openai/primary"


async def test_a_failing_primary_falls_back_after_its_retries(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("primary", error(500, "boom"), error(500, "boom"))
    openai_server.script("backup", answer("from the backup"))
    model = _model(models, _tier(openai_server, fallbacks=["openai/backup"]))
    completion = await model.complete(_request())
    assert completion.content == "from the backup"
    assert completion.model == "openai/backup"
    assert _outcomes(completion.attempts) == [
        ("openai/primary", "InternalServerError"),
        ("openai/primary", "InternalServerError"),
        ("openai/backup", "ok"),
    ]
    assert [r.model for r in openai_server.requests()] == ["primary", "primary", "backup"]


async def test_a_slow_answer_times_out_and_the_retry_answers(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("primary", answer("too late", delay_s=3.0), answer("in time"))
    model = _model(models, _tier(openai_server, timeout_s=0.5))
    completion = await model.complete(_request())
    assert completion.content == "in time"
    assert _outcomes(completion.attempts) == [("openai/primary", "Timeout"), ("openai/primary", "ok")]
    assert 0.4 <= completion.attempts[0].seconds < 2.0


async def test_a_failing_model_cools_down_and_calls_go_straight_to_the_fallback(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("primary", error(500), error(500))
    openai_server.script("backup", answer("one"), answer("two"))
    tier = _tier(openai_server, fallbacks=["openai/backup"], cooldown_after=2, cooldown_s=30.0)
    model = _model(models, tier)
    first = await model.complete(_request())
    assert first.content == "one"
    assert len(openai_server.requests("primary")) == 2
    second = await model.complete(_request())
    assert second.content == "two"
    # The primary is cooling down: the server saw no request for it.
    assert len(openai_server.requests("primary")) == 2
    assert _outcomes(second.attempts) == [("openai/backup", "ok")]


async def test_a_bad_request_is_not_retried(openai_server: OpenAIServer, models: list[LiteLLMModel]) -> None:
    openai_server.script("primary", error(400, "messages are malformed"))
    model = _model(models, _tier(openai_server, retries=2))
    with pytest.raises(RouterError) as info:
        await model.complete(_request())
    assert len(openai_server.requests("primary")) == 1
    assert info.value.retryable is False
    assert info.value.attempt == 1
    assert info.value.model == "openai/primary"
    assert _outcomes(info.value.attempts) == [("openai/primary", "BadRequestError")]


async def test_an_outage_is_a_retryable_router_error(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("primary", error(503, "down"), error(503, "down"))
    model = _model(models, _tier(openai_server))
    with pytest.raises(RouterError) as info:
        await model.complete(_request())
    assert info.value.retryable is True
    assert info.value.attempt == 2
    assert len(openai_server.requests("primary")) == 2


async def test_native_tool_calls_come_back_in_order_with_their_raw_arguments(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    first_args = '{"order_id": "1001"}'
    second_args = '{"order_id":"1001",  "amount_cents": 4000}'
    openai_server.script(
        "primary",
        answer(
            tool_calls=[("lookup_order", first_args), ("refund", second_args)],
            prompt_tokens=120,
            completion_tokens=30,
        ),
    )
    prices = {"openai/primary": ModelPrice(input_per_mtok=2.0, output_per_mtok=10.0)}
    model = _model(models, _tier(openai_server, prices=prices))
    history = [
        ChatTurn(role="system", content="You help."),
        ChatTurn(role="user", content="refund order 1001"),
        ChatTurn(
            role="assistant",
            tool_calls=[ChatToolCall(id="call_a", name="lookup_order", arguments=first_args)],
        ),
        ChatTurn(role="tool", tool_call_id="call_a", content='{"status": "paid"}'),
    ]
    completion = await model.complete(
        CompletionRequest(agent="payments", messages=history, tools=[LOOKUP, REFUND])
    )
    assert [(c.name, c.arguments) for c in completion.tool_calls] == [
        ("lookup_order", first_args),
        ("refund", second_args),
    ]
    assert all(c.id for c in completion.tool_calls)
    assert (completion.input_tokens, completion.output_tokens) == (120, 30)
    assert completion.cost_usd == pytest.approx((120 * 2.0 + 30 * 10.0) / 1e6)
    (sent,) = openai_server.requests("primary")
    assert sent.tool_choice == "required"
    assert sent.tools is not None
    assert [t["function"]["name"] for t in sent.tools] == ["lookup_order", "refund"]
    assert sent.tools[0] == {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order.",
            "parameters": LOOKUP.parameters,
        },
    }
    assert sent.messages[2]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "lookup_order", "arguments": first_args}}
    ]
    assert sent.messages[3] == {"role": "tool", "content": '{"status": "paid"}', "tool_call_id": "call_a"}


async def test_an_unpriced_model_costs_nothing_and_tokens_are_counted(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("primary", answer("plain", prompt_tokens=7, completion_tokens=3))
    completion = await _model(models, _tier(openai_server)).complete(_request())
    assert (completion.content, completion.tool_calls) == ("plain", [])
    assert (completion.input_tokens, completion.output_tokens, completion.cost_usd) == (7, 3, 0.0)
    (sent,) = openai_server.requests("primary")
    assert sent.tools is None and sent.tool_choice is None


async def test_the_text_protocol_asks_in_the_prompt_and_reads_the_json_back(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    written = 'Sure!\n```json\n{"calls": [{"name": "refund", "arguments": {"order_id": "1001"}}]}\n```'
    openai_server.script("primary", answer(written), answer("I do not know which tool."))
    model = _model(models, _tier(openai_server, tools="text"))
    completion = await model.complete(_request("refund 1001", tools=[LOOKUP, REFUND]))
    assert [(c.id, c.name, json.loads(c.arguments)) for c in completion.tool_calls] == [
        ("call_0", "refund", {"order_id": "1001"})
    ]
    (sent,) = openai_server.requests("primary")
    assert sent.tools is None and sent.tool_choice is None and sent.response_format is None
    system = sent.messages[0]["content"]
    assert system.startswith("You help.") and '"calls"' in system and "lookup_order" in system
    # An answer without the JSON is plain content: the caller tells the model.
    unparsed = await model.complete(_request("refund 1001", tools=[LOOKUP, REFUND]))
    assert (unparsed.content, unparsed.tool_calls) == ("I do not know which tool.", [])


async def test_the_json_schema_protocol_sends_a_response_format_and_reads_the_calls(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    decided = {
        "calls": [
            {"name": "lookup_order", "arguments": {"order_id": "7"}},
            {"name": "refund", "arguments": {}},
        ]
    }
    openai_server.script("primary", answer(json.dumps(decided)))
    model = _model(models, _tier(openai_server, tools="json_schema"))
    history = [
        ChatTurn(role="user", content="hi"),
        ChatTurn(
            role="assistant", tool_calls=[ChatToolCall(id="call_x", name="lookup_order", arguments="{}")]
        ),
        ChatTurn(role="tool", tool_call_id="call_x", content="not found"),
    ]
    completion = await model.complete(CompletionRequest(agent="a", messages=history, tools=[LOOKUP, REFUND]))
    assert [(c.id, c.name, c.arguments) for c in completion.tool_calls] == [
        ("call_0", "lookup_order", '{"order_id": "7"}'),
        ("call_1", "refund", "{}"),
    ]
    (sent,) = openai_server.requests("primary")
    assert sent.tools is None and sent.tool_choice is None
    assert sent.response_format is not None and sent.response_format["type"] == "json_schema"
    schema = sent.response_format["json_schema"]["schema"]
    names = [b["properties"]["name"]["enum"] for b in schema["properties"]["calls"]["items"]["anyOf"]]
    assert names == [["lookup_order"], ["refund"]]
    # No tool roles reach a model that was not offered native tools.
    assert [m["role"] for m in sent.messages] == ["system", "user", "assistant", "user"]
    assert "tool_calls" not in sent.messages[2]


async def test_concurrent_calls_of_two_tiers_keep_their_own_attempts(
    openai_server: OpenAIServer, models: list[LiteLLMModel]
) -> None:
    openai_server.script("flaky", error(500), answer("flaky answered"))
    openai_server.script("steady", answer("steady answered", delay_s=0.2))
    flaky = _model(models, _tier(openai_server, model="openai/flaky"))
    steady = _model(models, _tier(openai_server, model="openai/steady"))
    first, second = await asyncio.gather(flaky.complete(_request()), steady.complete(_request()))
    assert _outcomes(first.attempts) == [("openai/flaky", "InternalServerError"), ("openai/flaky", "ok")]
    assert _outcomes(second.attempts) == [("openai/steady", "ok")]


async def test_a_model_without_a_price_counts_zero_and_says_so_once(
    openai_server: OpenAIServer, models: list[LiteLLMModel], caplog: pytest.LogCaptureFixture
) -> None:
    """A model litellm's map does not know and the tier gives no price for: its calls are
    free to the budgets, which the operator is told once, when the gateway starts (not on
    every call, and not for a tier that prices it)."""
    openai_server.script("unpriced", answer("one"), answer("two"))
    with caplog.at_level("WARNING", logger="corral.router._litellm"):
        # (a name no other test uses: a tier with prices registers its model in litellm's map)
        model = _model(models, _tier(openai_server, model="openai/unpriced"))
        first = await model.complete(_request())
        second = await model.complete(_request())
        priced = _model(
            models,
            _tier(openai_server, model="openai/unpriced-2", prices={"openai/unpriced-2": ModelPrice()}),
        )
    assert (first.cost_usd, second.cost_usd) == (0.0, 0.0)
    del priced
    said = [r.getMessage() for r in caplog.records if "has no price" in r.getMessage()]
    assert said == [
        "model openai/unpriced has no price in litellm's map: its calls count $0 toward budgets;"
        " set models.http.prices"
    ]

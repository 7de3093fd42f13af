"""Model calls go through the real litellm path; the scripted provider answers offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.bus import ChatToolCall, ChatTurn, ToolSpec
from corral.router import (
    Completion,
    CompletionRequest,
    LiteLLMModel,
    ModelTier,
    RouterError,
    ScriptedModel,
    load_rules,
    model_for_tier,
)
from corral.router._protocols import offer, read
from corral.supervisor import load_config
from tests.conftest import SAMPLE_CONFIG


def _request(agent: str, text: str) -> CompletionRequest:
    return CompletionRequest(
        agent=agent,
        messages=[ChatTurn(role="system", content="x"), ChatTurn(role="user", content=text)],
    )


def _calls(completion: Completion) -> list[tuple[str, dict[str, object]]]:
    return [(c.name, json.loads(c.arguments)) for c in completion.tool_calls]


async def test_scripted_provider_answers_through_litellm() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    model = model_for_tier(loaded.tier("triage"), loaded.scripted_rules)
    import litellm

    assert any(p["provider"] == "scripted" for p in litellm.custom_provider_map)
    completion = await model.complete(_request("triage", "Please REFUND me"))
    assert completion.model == "scripted/support"
    assert completion.output_tokens > 0
    assert completion.content == ""
    assert _calls(completion) == [
        ("transfer_to_payments", {"reason": "billing question", "confidence": 0.93})
    ]
    assert [(a.model, a.outcome) for a in completion.attempts] == [("scripted/support", "ok")]


async def test_missing_rule_is_a_non_retryable_router_error() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    model = model_for_tier(loaded.tier("triage"), loaded.scripted_rules)
    with pytest.raises(RouterError) as info:
        await model.complete(_request("nobody", "hi"))
    assert info.value.retryable is False
    assert "no scripted rule for agent 'nobody'" in str(info.value)
    # Scripted models are deterministic: a missing rule is not retried.
    assert [(a.model, a.outcome) for a in info.value.attempts] == [("scripted/support", "ScriptError")]


async def test_fallback_model_answers_when_the_first_fails() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    tier = ModelTier(name="fast", model="scripted/missing", fallbacks=["scripted/support"])
    model = model_for_tier(tier, loaded.scripted_rules)
    completion = await model.complete(_request("account_manager", "my plan?"))
    assert [name for name, _ in _calls(completion)] == ["reply"]
    assert completion.model == "scripted/support"
    assert [(a.model, a.outcome) for a in completion.attempts] == [
        ("scripted/missing", "ScriptError"),
        ("scripted/support", "ok"),
    ]


async def test_scripted_tool_turns_reach_the_rules_in_openai_shape(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "agents:\n"
        "  payments:\n"
        "    - when: ['tool refund -> ok']\n"
        "      answer: {action: reply, text: done, confidence: 0.9}\n"
        "    - answer:\n"
        "        - {action: tool, tool: lookup_order, arguments: {order_id: '1'}}\n"
        "        - {action: tool, tool: refund, arguments: {order_id: '1'}}\n"
        "      cost_usd: 0.25\n"
    )
    tier = ModelTier(name="fast", model="scripted/rules")
    model = model_for_tier(tier, {"rules": path})
    assert isinstance(model, LiteLLMModel) and model.protocol == "native"
    try:
        first = await model.complete(_request("payments", "refund order 1"))
        assert [name for name, _ in _calls(first)] == ["lookup_order", "refund"]
        assert first.cost_usd == 0.25
        history = [
            *_request("payments", "refund order 1").messages,
            ChatTurn(role="assistant", tool_calls=first.tool_calls),
            ChatTurn(role="tool", tool_call_id=first.tool_calls[1].id, content="tool refund -> ok"),
        ]
        second = await model.complete(CompletionRequest(agent="payments", messages=history))
        assert _calls(second) == [("reply", {"text": "done", "confidence": 0.9})]
    finally:
        model.close()


def test_rules_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("agents:\n  triage:\n    - wen: [x]\n      answer: hi\n")
    with pytest.raises(RouterError, match="wen"):
        load_rules(path)


async def test_a_pattern_rule_answers_with_what_it_matched(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "agents:\n"
        "  payments:\n"
        "    - when: [refund]\n"
        "      pattern: 'order (?P<order>\\d+)'\n"
        "      answer: {action: tool, tool: refund, arguments: {order_id: '{order}', note: '{kept}'}}\n"
        "    - answer: no order named\n"
    )
    model = ScriptedModel(load_rules(path))
    completion = await model.complete(_request("payments", "Refund ORDER 4711 please"))
    assert _calls(completion) == [("refund", {"order_id": "4711", "note": "{kept}"})]
    # `when` matched but the pattern did not: the next rule answers.
    assert (await model.complete(_request("payments", "a refund, please"))).content == "no order named"


def test_a_bad_pattern_is_refused_when_the_rules_load(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("agents:\n  triage:\n    - pattern: 'order (\\d+'\n      answer: hi\n")
    with pytest.raises(RouterError, match="is not a regular expression"):
        load_rules(path)


async def test_direct_tiers_answer_at_corrals_model_interface_without_litellm() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    tier = ModelTier(name="fast", model="scripted/support", via="direct")
    model = model_for_tier(tier, loaded.scripted_rules)
    assert isinstance(model, ScriptedModel)
    completion = await model.complete(_request("triage", "Please REFUND me"))
    assert completion.model == "scripted/support"
    assert _calls(completion) == [
        ("transfer_to_payments", {"reason": "billing question", "confidence": 0.93})
    ]


def test_non_native_answers_are_read_from_their_outermost_json_object() -> None:
    fenced = 'Here:\n```json\n{"calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]}\n```'
    assert read(fenced) == (
        "",
        [ChatToolCall(id="call_0", name="a", arguments='{"x": 1}'), ChatToolCall(id="call_1", name="b")],
    )
    assert read('{"name": "a", "arguments": "{broken"}') == (
        "",
        [ChatToolCall(id="call_0", name="a", arguments="{broken")],
    )
    for unparsed in [
        "no json here",
        '{"calls": []}',
        '{"calls": [{"arguments": {}}]}',
        "{not json}",
        '{"x": 1}',
    ]:
        assert read(unparsed) == (unparsed, [])


def test_the_text_protocol_lists_the_tools_in_the_system_prompt_and_keeps_no_tool_roles() -> None:
    tool = ToolSpec(name="lookup", description="Find it.", parameters={"type": "object"})
    history = [
        ChatTurn(role="user", content="find 1"),
        ChatTurn(role="assistant", tool_calls=[ChatToolCall(id="c1", name="lookup", arguments='{"id": 1}')]),
        ChatTurn(role="tool", tool_call_id="c1", content="found"),
    ]
    sent = offer("text", history, [tool])
    assert sent.params == {}
    assert [m["role"] for m in sent.messages] == ["system", "user", "assistant", "user"]
    assert "lookup: Find it." in sent.messages[0]["content"]
    assert json.loads(sent.messages[2]["content"]) == {"calls": [{"name": "lookup", "arguments": {"id": 1}}]}
    assert "c1" in sent.messages[3]["content"] and "found" in sent.messages[3]["content"]
    # Without tools every protocol is a plain chat request.
    assert offer("json_schema", history[:1], []).params == {}

"""Model calls go through the real litellm path; the scripted provider answers offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.agents import HandoffDecision, ReplyDecision, parse_decision
from corral.agents.errors import DecisionError
from corral.router import (
    ChatMessage,
    CompletionRequest,
    ModelTier,
    RouterError,
    ScriptedModel,
    load_rules,
    model_for_tier,
)
from corral.supervisor import load_config
from tests.conftest import SAMPLE_CONFIG


def _request(agent: str, text: str) -> CompletionRequest:
    return CompletionRequest(
        agent=agent,
        messages=[ChatMessage(role="system", content="x"), ChatMessage(role="user", content=text)],
    )


async def test_scripted_provider_answers_through_litellm() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    model = model_for_tier(loaded.tier("triage"), loaded.scripted_rules)
    import litellm

    assert any(p["provider"] == "scripted" for p in litellm.custom_provider_map)
    completion = await model.complete(_request("triage", "Please REFUND me"))
    assert completion.model == "scripted/support"
    assert completion.output_tokens > 0
    decision = parse_decision(completion.text, agent="triage")
    assert decision == HandoffDecision(target="payments", confidence=0.93, reason="billing question")


async def test_missing_rule_is_a_non_retryable_router_error() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    model = model_for_tier(loaded.tier("triage"), loaded.scripted_rules)
    with pytest.raises(RouterError) as info:
        await model.complete(_request("nobody", "hi"))
    assert info.value.retryable is False
    assert "no scripted rule for agent 'nobody'" in str(info.value)


async def test_fallback_model_answers_when_the_first_fails() -> None:
    loaded = load_config(SAMPLE_CONFIG)
    tier = ModelTier(name="fast", model="scripted/missing", fallbacks=["scripted/support"])
    model = model_for_tier(tier, loaded.scripted_rules)
    completion = await model.complete(_request("account_manager", "my plan?"))
    assert isinstance(parse_decision(completion.text, agent="account_manager"), ReplyDecision)


def test_decisions_are_parsed_strictly() -> None:
    assert parse_decision('Sure! ```{"action": "reply", "text": "hi"}```', agent="a") == ReplyDecision(
        text="hi"
    )
    for bad in [
        "no json here",
        '{"action": "launch"}',
        '{"action": "handoff", "target": "x"}',
        '{"action": "reply", "text": "x", "confidence": 7}',
    ]:
        with pytest.raises(DecisionError):
            parse_decision(bad, agent="a")


def test_rules_file_is_validated(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "rules.yaml"
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
    assert json.loads(completion.text) == {
        "action": "tool",
        "tool": "refund",
        "arguments": {"order_id": "4711", "note": "{kept}"},
    }
    # `when` matched but the pattern did not: the next rule answers.
    assert (await model.complete(_request("payments", "a refund, please"))).text == "no order named"


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
    decision = parse_decision(completion.text, agent="triage")
    assert decision == HandoffDecision(target="payments", confidence=0.93, reason="billing question")

"""`corral validate`: what a team's processes read at start is checked before any starts; the
first problem names its file and line (exit 2), a good team lists what was checked (exit 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.supervisor import ConfigError
from corral.supervisor.stack._validate import validate
from tests.conftest import SAMPLE_CONFIG


@pytest.fixture
def team(tmp_path: Path) -> Path:
    """A copy of the sample team; returns its corral.yaml."""
    shutil.copytree(SAMPLE_CONFIG.parent, tmp_path / "team")
    return tmp_path / "team" / "corral.yaml"


def _edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` (which must occur) by ``new`` in ``path``; the 1-based line it was on."""
    text = path.read_text()
    assert old in text, old
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new, 1))
    return line


def _corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_the_sample_team_validates_and_says_what_was_checked(team: Path) -> None:
    result = _corral("validate", "-c", str(team))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "config",
        "instructions",
        "tools",
        "policies",
        "scripted rules",
        "model keys",
        "ok",
    ]
    assert "4 agents (triage, payments, tech_support, account_manager)" in lines[0]
    assert "refund" in lines[2] and "policies" in lines[3]


def test_a_cedar_syntax_error_names_the_policy_file_and_line(team: Path) -> None:
    policy = team.parent / "policies" / "refunds.cedar"
    line = _edit(policy, "when { context.amount_cents <= 0 };", "when { context.amount_cents <= };")
    result = _corral("validate", "-c", str(team))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{policy}:" in result.stderr and "ok" not in result.stdout
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert caught.value.path == str(policy)
    # Cedar reports where the policy starts, or the line of the broken expression.
    assert caught.value.line is not None and line - 3 <= caught.value.line <= line


def test_a_policy_naming_a_fact_no_tool_declares_is_an_error_at_its_line(team: Path) -> None:
    """The policies are loaded as the supervisor loads them, so the gateway's schema
    validation is part of the check: a misspelled fact is an error, not a silent deny."""
    policy = team.parent / "policies" / "refunds.cedar"
    line = _edit(policy, "when { context.amount_cents <= 0 };", "when { context.amount_cent <= 0 };")
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert caught.value.path == str(policy)
    assert caught.value.line is not None and line - 3 <= caught.value.line <= line
    assert "amount_cent" in str(caught.value)


def test_a_tools_module_with_a_syntax_error_names_its_line(team: Path) -> None:
    tools = team.parent / "tools.py"
    line = _edit(tools, "class LookupCustomer(", "class LookupCustomer((")
    result = _corral("validate", "-c", str(team))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert (caught.value.path, caught.value.line) == (str(tools), line)


def test_a_tools_module_that_raises_at_import_names_the_line_that_raised(team: Path) -> None:
    tools = team.parent / "tools.py"
    text = tools.read_text()
    marker = "\nclass LookupCustomer("
    tools.write_text(text.replace(marker, "\nraise RuntimeError('the shop is closed')\n" + marker, 1))
    line = next(i for i, row in enumerate(tools.read_text().splitlines(), 1) if "shop is closed" in row)
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert (caught.value.path, caught.value.line) == (str(tools), line)
    assert "RuntimeError: the shop is closed" in str(caught.value)


def test_an_agent_naming_a_tool_that_does_not_exist_is_an_error(team: Path) -> None:
    line = _edit(
        team,
        "tools: [verify_customer, lookup_customer, lookup_order]",
        "tools: [verify_customer, lookup_customer, lookup_ordr]",
    )
    result = _corral("validate", "-c", str(team))
    assert result.returncode == 2
    assert f"{team}:{line}: agents.triage.tools[2]: 'lookup_ordr' is not a tool" in result.stderr


def test_broken_scripted_rules_name_their_file_and_line(team: Path) -> None:
    rules = team.parent / "scripted.yaml"
    line = _edit(rules, "confidence: 0.88", "confidence: 0.88, bogus: [")
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert caught.value.path == str(rules)
    assert caught.value.line is not None and line <= caught.value.line <= line + 2


def test_an_agent_without_scripted_rules_is_an_error_naming_the_rules_file(team: Path) -> None:
    rules = team.parent / "scripted.yaml"
    _edit(rules, "  tech_support:\n", "  tech_support_old:\n")
    with pytest.raises(ConfigError) as caught:
        validate(str(team))
    assert caught.value.path == str(rules)
    assert "no rules for 'tech_support'" in str(caught.value)


SMART = "  smart:\n    model: scripted/support\n"
NEEDS_A_KEY = SMART + "    api_key_env: CORRAL_TEST_NO_SUCH_KEY\n"


def test_a_model_tier_whose_api_key_is_unset_names_the_variable(team: Path) -> None:
    line = _edit(team, SMART, NEEDS_A_KEY) + 2  # the api_key_env line
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_TEST_NO_SUCH_KEY"}
    result = _corral("validate", "-c", str(team), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{team}:{line}: models.smart.api_key_env" in result.stderr
    assert "CORRAL_TEST_NO_SUCH_KEY is not set" in result.stderr
    assert "payments, account_manager" in result.stderr  # who calls that tier
    # With the variable set it validates; empty counts as unset.
    assert _corral("validate", "-c", str(team), env={**env, "CORRAL_TEST_NO_SUCH_KEY": ""}).returncode == 2
    ok = _corral("validate", "-c", str(team), env={**env, "CORRAL_TEST_NO_SUCH_KEY": "k"})
    assert ok.returncode == 0, ok.stderr
    assert "model keys: set: CORRAL_TEST_NO_SUCH_KEY" in ok.stdout


def test_the_model_gateway_refuses_to_start_without_a_tiers_key_naming_the_variable(team: Path) -> None:
    """The model gateway (the one process that holds keys) refuses to start (no NATS needed
    to find out), so a stack started past `corral validate` shows the reason instead of a
    conversation that hangs; agents need no key and start."""
    _edit(team, SMART, NEEDS_A_KEY)
    env = {k: v for k, v in os.environ.items() if k not in {"CORRAL_TEST_NO_SUCH_KEY", "NATS_URL"}}
    result = _corral("router", "run", "-c", str(team), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the model gateway cannot start" in result.stderr
    assert "CORRAL_TEST_NO_SUCH_KEY is not set" in result.stderr


def test_a_tier_no_agent_calls_needs_no_key(team: Path) -> None:
    """Only the tiers agents call (or escalate to) are served and need their key."""
    _edit(
        team,
        "models:\n",
        "models:\n  spare:\n    model: openai/gpt-4o\n    api_key_env: CORRAL_TEST_NO_SUCH_KEY\n",
    )
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_TEST_NO_SUCH_KEY"}
    result = _corral("validate", "-c", str(team), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CORRAL_TEST_NO_SUCH_KEY" not in result.stdout + result.stderr

"""The whole team over litellm's real OpenAI provider: `corral up`'s model gateway calls a
scripted OpenAI-compatible server on loopback. A rate limit with Retry-After is retried
after the pause the server asked for, every attempt is journaled on the step with its
tokens and dollars (at the tier's configured prices), and the request the provider saw
carried the agent's native tools. A tier whose key is unset stops the gateway at start."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from corral.supervisor import send_and_wait
from tests.conftest import SAMPLE_CONFIG
from tests.openai_server import OpenAIServer, answer, error
from tests.stack import Stack, running_stack

KEY_VARIABLE = "CORRAL_TEST_PROVIDER_KEY"


@pytest.fixture(scope="module")
def provider() -> Iterator[OpenAIServer]:
    server = OpenAIServer()
    server.start()
    yield server
    server.stop()


def _team(directory: Path, provider: OpenAIServer) -> Path:
    shutil.copytree(SAMPLE_CONFIG.parent, directory)
    config = yaml.safe_load((directory / "corral.yaml").read_text())
    config["models"]["fast"] = {
        "model": "openai/triage-model",
        "api_base": provider.url,
        "api_key_env": KEY_VARIABLE,
        "retries": 2,
        "timeout_s": 10,
        "prices": {"openai/triage-model": {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}},
    }
    config["agents"]["triage"]["tier"] = "fast"
    for name in ("payments", "tech_support", "account_manager"):
        config["agents"][name]["tier"] = "smart"
    (directory / "corral.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory / "corral.yaml"


@pytest.fixture(scope="module")
async def team(
    provider: OpenAIServer, postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    from tests.conftest import _fresh_database

    config = _team(tmp_path_factory.mktemp("http") / "support", provider)
    database = await _fresh_database(postgres_admin_dsn)
    os.environ[KEY_VARIABLE] = "sk-test-http"
    try:
        async with running_stack(tmp_path_factory.mktemp("state"), database, None, config) as stack:
            yield stack
    finally:
        del os.environ[KEY_VARIABLE]


async def test_a_rate_limit_is_retried_after_its_pause_and_every_attempt_is_on_record(
    team: Stack, provider: OpenAIServer
) -> None:
    provider.script(
        "triage-model",
        error(429, "slow down", retry_after="2"),
        answer(
            tool_calls=[("transfer_to_tech_support", json.dumps({"reason": "app error", "confidence": 0.9}))],
            prompt_tokens=100,
            completion_tokens=20,
        ),
    )
    client = await team.connect()
    try:
        ended = await send_and_wait(
            client, "The app shows an error since this morning.", customer="cus_1002", timeout_s=60
        )
    finally:
        await client.close()
    assert ended.status == "replied" and [h.agent for h in ended.path] == ["triage", "tech_support"]
    first, second = provider.requests("triage-model")
    assert second.at - first.at >= 1.9  # the server's Retry-After, honoured
    # The provider saw the agent's native tools: its team tools, one transfer per edge, reply.
    offered = {tool["function"]["name"] for tool in second.tools or []}
    assert {"lookup_customer", "lookup_order", "reply"} <= offered
    assert {"transfer_to_payments", "transfer_to_tech_support", "transfer_to_account_manager"} <= offered
    assert second.tool_choice == "required"
    payments = next(t for t in second.tools or [] if t["function"]["name"] == "transfer_to_payments")
    assert "order_id" in payments["function"]["parameters"]["properties"]  # the edge's payload
    [row] = await team.sql(
        "SELECT tier, model, input_tokens, output_tokens, cost_usd, confidence, attempts::text AS attempts"
        " FROM step_journal WHERE conversation=$1 AND step=1",
        ended.conversation,
    )
    assert (row["tier"], row["input_tokens"], row["output_tokens"]) == ("fast", 100, 20)
    assert row["cost_usd"] == pytest.approx(100 * 1000.0 / 1e6 + 20 * 2000.0 / 1e6)
    assert row["confidence"] == pytest.approx(0.9)
    attempts = json.loads(row["attempts"])
    assert [a["outcome"] for a in attempts] == ["RateLimitError", "ok"]
    shown = await asyncio.to_thread(team.corral, "show", ended.conversation)
    assert "step 1 #0 triage fast" in shown.stdout and "2 attempts" in shown.stdout, shown.stdout


def test_a_tier_whose_key_is_unset_stops_the_model_gateway_at_start(
    provider: OpenAIServer, tmp_path: Path
) -> None:
    config = _team(tmp_path / "support", provider)
    env = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
    env["CORRAL_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "router", "run", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the environment variable {KEY_VARIABLE} is not set" in done.stderr
    assert "models.fast.api_key_env" in done.stderr


async def test_the_next_step_sees_the_earlier_steps_tool_calls_as_native_history(
    team: Stack, provider: OpenAIServer
) -> None:
    """triage looks the customer up and asks which order; at the customer's answer, its
    next step's request carries that lookup as the provider's own tool-calling history
    (the assistant's call, then its result), before the customer's latest message."""
    from corral.bus import ConversationAwaiting
    from corral.supervisor.core._client import message_until_settled, send_until_settled

    def reply(text: str, awaiting: bool) -> tuple[str, str]:
        return ("reply", json.dumps({"text": text, "confidence": 0.9, "awaiting_customer": awaiting}))

    provider.script(
        "triage-model",
        answer(tool_calls=[("lookup_customer", "{}")]),
        answer(tool_calls=[reply("Which order do you mean?", True)]),
        answer(tool_calls=[reply("Thanks, that settles it.", False)]),
    )
    client = await team.connect()
    try:
        asked = await send_until_settled(
            client, "Something is wrong with my order.", customer="cus_1002", timeout_s=60
        )
        assert isinstance(asked, ConversationAwaiting), asked
        ended = await message_until_settled(client, asked.conversation, "Order 1005.", timeout_s=60)
    finally:
        await client.close()
    assert ended.status == "replied", ended  # type: ignore[union-attr]
    *_, third = provider.requests("triage-model")
    history = [m for m in third.messages if m["role"] != "system"]
    [call] = history[1]["tool_calls"]
    assert (history[0]["role"], history[1]["role"], call["function"]["name"]) == (
        "user",
        "assistant",
        "lookup_customer",
    )
    assert history[2]["role"] == "tool" and history[2]["tool_call_id"] == call["id"]
    assert (
        history[2]["content"].startswith("tool lookup_customer -> ok")
        and "ben@example.com" in history[2]["content"]
    )
    assert history[3] == {"role": "assistant", "content": "Which order do you mean?"}
    assert history[-1]["role"] == "user" and "Order 1005." in history[-1]["content"]
    shown = await asyncio.to_thread(team.corral, "show", ended.conversation)
    assert "triage called lookup_customer {}: tool lookup_customer -> ok" in shown.stdout, shown.stdout

"""The console in a real headless browser (Debian's chromium, driven by Playwright; no
browser download): signed in with the one-time login `corral up` printed, it shows a new
conversation without a reload, approves a pending approval, takes over an escalated
conversation (claim, reply, hand back) as the customer's SSE stream sees it, and kills an
agent as `corral status` then says. Each test saves a screenshot (``artifacts/console``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import eventually
from tests.stack import Stack, running_stack

playwright_api = pytest.importorskip("playwright.async_api")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (see the README)"
)
ARTIFACTS = (
    Path(os.environ.get("CORRAL_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")) / "console"
)


@dataclass
class Console:
    stack: Stack
    url: str
    login: str
    web: httpx.AsyncClient
    page: Any
    errors: list[str]
    """What the page logged as errors (a refusal by its content security policy, say)."""


@pytest.fixture(scope="module")
async def console(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> AsyncIterator[Console]:
    assert BROWSER is not None, "Debian's chromium is not installed (see the README)"
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:
        printed = await eventually(
            lambda: re.search(r"console: \S+ — sign in once with (\S+#login=\S+)", stack.log.read_text()),
            message="corral up printed the console's one-time login",
        )
        made = stack.corral("api-key", "create", "--client", "web", "--customer", "cus_1001", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        runtime = stack.runtime()
        assert runtime is not None
        headers = {"Authorization": f"Bearer {json.loads(made.stdout)['key']}"}
        async with (
            httpx.AsyncClient(base_url=runtime["api_url"], headers=headers, timeout=60) as web,
            playwright_api.async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            await page.goto(printed.group(1))
            await page.wait_for_selector("table#conversations")
            yield Console(stack, runtime["api_url"], printed.group(1), web, page, errors)
            await browser.close()


async def _screenshot(console: Console, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await console.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _start(console: Console, text: str) -> str:
    started = await console.web.post("/v1/conversations", json={"text": text})
    assert started.status_code in (201, 202), started.text
    return str(started.json()["conversation"])


async def _status(console: Console, conversation: str) -> str:
    return str((await console.web.get(f"/v1/conversations/{conversation}")).json()["status"])


async def test_the_login_is_one_time(console: Console) -> None:
    again = await console.web.post("/v1/console/login", json={"login": console.login.split("#login=")[1]})
    assert again.status_code == 401 and "used" in again.json()["detail"]


async def test_the_list_shows_a_new_conversation_without_a_reload(console: Console) -> None:
    page = console.page
    await page.goto(f"{console.url}/console/#/conversations")
    await page.wait_for_selector("#live.on")
    await page.evaluate("window.notReloaded = true")
    conversation = await _start(console, "How do I change my email address?")
    row = page.locator(f'tr[data-conversation="{conversation}"]')
    await row.wait_for(timeout=30_000)
    await page.locator(f'tr[data-conversation="{conversation}"] [data-status="replied"]').wait_for(
        timeout=60_000
    )
    assert await page.evaluate("window.notReloaded") is True
    # Filtered by status and agent, as an operator narrows it.
    await page.select_option('[data-testid="filter-status"]', "replied")
    await page.wait_for_url(re.compile(r"status=replied"))
    await row.wait_for()
    await _screenshot(console, "list")
    await page.select_option('[data-testid="filter-status"]', "escalated")
    await row.wait_for(state="detached")
    # The conversation's view: its lanes and its transcript.
    await page.goto(f"{console.url}/console/#/c/{conversation}")
    await page.wait_for_selector('[data-lane="supervisor"] .bar')
    assert await page.locator('[data-testid="transcript"] [data-role="customer"]').count() == 1
    await _screenshot(console, "conversation")


async def test_approve_on_a_pending_approval_completes_the_conversation(console: Console) -> None:
    page = console.page
    conversation = await _start(console, "Please refund order 1002")
    await eventually(lambda: _waiting(console, conversation), timeout=60, message="waiting for an approval")
    await page.goto(f"{console.url}/console/#/queues")
    row = page.locator("tr[data-approval]", has=page.locator(f'a[href="#/c/{conversation}"]'))
    await row.wait_for(timeout=30_000)
    await _screenshot(console, "approval")
    await row.get_by_role("button", name="Approve").click()
    await eventually(
        lambda: _is(console, conversation, "replied"), timeout=60, message="the approved conversation replied"
    )
    # Decided under the console's operator, and the call it let through is in the audit chain.
    decided = await console.stack.sql(
        "SELECT id, decided_by FROM approvals WHERE conversation=$1", conversation
    )
    assert [r["decided_by"] for r in decided] == ["console"]
    audit = await console.stack.sql(
        "SELECT outcome FROM audit_log WHERE conversation=$1 AND approval_id=$2",
        conversation,
        decided[0]["id"],
    )
    assert "applied" in {r["outcome"] for r in audit}, audit


async def _waiting(console: Console, conversation: str) -> bool:
    return await _status(console, conversation) == "waiting"


async def _is(console: Console, conversation: str, status: str) -> bool:
    return await _status(console, conversation) == status


async def test_claim_reply_and_hand_back_reach_the_customers_stream(console: Console) -> None:
    page = console.page
    conversation = await _start(console, "My lawyer says I should sue you")
    await eventually(lambda: _is(console, conversation, "escalated"), timeout=60, message="escalated")
    seen: list[dict[str, Any]] = []
    following = asyncio.create_task(_follow(console, conversation, seen))
    try:
        await page.goto(f"{console.url}/console/#/queues")
        row = page.locator(f'tr[data-queued="{conversation}"]')
        await row.wait_for(timeout=30_000)
        await row.get_by_role("button", name="Claim").click()
        await row.get_by_text("claimed by console").wait_for()
        await row.locator('[data-testid="reply-text"]').fill("A colleague will call you.")
        await row.get_by_role("button", name="Reply").click()
        await eventually(
            lambda: any(e["data"].get("text") == "A colleague will call you." for e in seen),
            timeout=30,
            message="the human reply on the customer's stream",
        )
        # Answered, it stays in the queue, held, until the customer answers or it is handed
        # back (the page shows it so once it has read the queue again).
        row = page.locator(f'tr[data-queued="{conversation}"]')
        await row.locator('[data-status="awaiting_customer"]').wait_for(timeout=30_000)
        await row.locator('[data-testid="handback-agent"]').select_option("account_manager")
        await _screenshot(console, "queue")
        await row.get_by_role("button", name="Hand back").click()
        await eventually(
            lambda: any(
                e["event"] == "handoff.forwarded" or e["data"].get("agent") == "account_manager" for e in seen
            ),
            timeout=60,
            message="the handback on the customer's stream",
        )
    finally:
        following.cancel()
    human = [e for e in seen if e["data"].get("agent") == "human"]
    assert human and human[0]["data"]["text"] == "A colleague will call you."


async def _follow(console: Console, conversation: str, seen: list[dict[str, Any]]) -> None:
    event: dict[str, Any] = {}
    async with console.web.stream("GET", f"/v1/conversations/{conversation}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = {"event": line[6:].strip()}
            elif line.startswith("data:") and event:
                event["data"] = json.loads(line[5:].strip())
                seen.append(event)
                event = {}


async def test_kill_on_an_agent_shows_it_killed_in_corral_status(console: Console) -> None:
    page = console.page
    await page.goto(f"{console.url}/console/#/agents")
    row = page.locator('tr[data-agent="tech_support"]')
    await row.wait_for(timeout=30_000)
    await row.get_by_role("button", name="Kill").click()
    await row.locator('[data-testid="state"]', has_text="killed by console").wait_for(timeout=30_000)
    await _screenshot(console, "agents")

    async def killed() -> bool:
        done = await asyncio.to_thread(console.stack.corral, "status", "--json")
        processes = {p["name"]: p for p in json.loads(done.stdout)["processes"]}
        return bool(processes["tech_support"]["state"] == "killed")

    await eventually(killed, timeout=30, message="corral status says tech_support is killed")
    await row.get_by_role("button", name="Revive").click()
    await row.locator('[data-testid="state"]', has_text="running").wait_for(timeout=30_000)


async def test_the_page_is_served_so_no_other_site_can_frame_it_or_run_script_in_it(console: Console) -> None:
    """Its files say so (it holds an operator's key); and every view the tests above opened
    ran within that policy (the lanes' bars, the graph), with nothing refused."""
    for path in ("/console/", "/console/console.js"):
        served = await console.web.get(path)
        assert served.status_code == 200
        policy = served.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert served.headers["x-frame-options"] == "DENY"
        assert served.headers["x-content-type-options"] == "nosniff"
    page = console.page
    await page.goto(f"{console.url}/console/#/graph")
    await page.wait_for_selector('[data-testid="graph"]')
    refused = [error for error in console.errors if "Content Security Policy" in error]
    assert not refused, refused

"""The CLI against a running team (`corral up` on the sample): every command says what
happened. `send` prints the id to look up, `show` tells the whole story (a failed tool
call too), `--json` gives one document, piped tables keep whole ids, unknown ids exit 2
and change nothing, `rollback` speaks in sentences, `status` shows killed agents."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import eventually
from tests.stack import Stack, running_stack

REFUND = "I was charged twice for order 1001, please refund the duplicate."


@pytest.fixture(scope="module")
async def stack(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:
        yield stack


async def corral(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``corral ARGS -c CONFIG`` as a user runs it; its stdout is a pipe, not a terminal."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "corral.supervisor", *args, "-c", str(stack.config)],
        env=stack.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def document(stack: Stack, *args: str, code: int = 0) -> Any:
    done = await corral(stack, *args, "--json")
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)  # one document, nothing else on stdout


async def test_send_prints_the_id_to_look_up_and_show_tells_what_happened(stack: Stack) -> None:
    # The message from stdin (`-`), as a message too long for a command line must come.
    sent = await corral(stack, "send", "-", stdin="How do I change my email address?")
    assert sent.returncode == 0, sent.stderr
    conversation = sent.stdout.strip()
    assert re.fullmatch(r"c-[0-9a-f]{20}", conversation), sent.stdout
    assert f"corral show {conversation}" in sent.stderr

    async def _replied() -> dict[str, Any] | None:
        shown = await document(stack, "show", conversation)
        return shown if shown["status"] == "replied" else None

    shown = await eventually(_replied, timeout=60, message="the conversation replied")
    assert [(h["agent"], h["confidence"]) for h in shown["path"]] == [
        ("triage", None),
        ("account_manager", 0.9),
    ]
    assert [(d["agent"], d["kind"], d["target"]) for d in shown["decisions"]][:2] == [
        ("triage", "started", None),
        ("triage", "forwarded", "account_manager"),
    ]
    assert shown["reply"].startswith("You can change your email")
    # What its model calls cost, from the journal: triage's and account_manager's.
    assert shown["spend"]["model_calls"] == 2 and shown["spend"]["tokens"] > 0, shown["spend"]
    text = await corral(stack, "show", conversation)
    assert text.returncode == 0, text.stderr
    assert f"conversation {conversation}" in text.stdout
    assert "  status:    replied" in text.stdout
    assert "  path:      triage -> account_manager (0.90)" in text.stdout
    assert "    triage forwarded -> account_manager (0.90): account question" in text.stdout, text.stdout
    assert "  reply:     You can change your email" in text.stdout
    assert f"  spend:     2 model calls, {shown['spend']['tokens']} tokens, $" in text.stdout
    # Newest first, with the filter.
    listed = await document(stack, "conversations", "--status", "replied", "--limit", "1")
    assert [c["id"] for c in listed] == [conversation]
    table = await corral(stack, "conversations", "--limit", "1")
    assert table.stdout.splitlines()[1].split()[:2] == [conversation, "replied"]


async def test_show_names_a_failed_tool_call_and_rollback_says_what_it_undid(stack: Stack) -> None:
    first = await document(stack, "send", "--wait", "--timeout", "90", "--customer", "cus_1001", REFUND)
    assert first["status"] == "replied", first
    assert [(t["agent"], t["tool"], t["status"]) for t in first["tools"]] == [("payments", "refund", "ok")]
    # The same refund again: nothing is left to refund, and the tool says so.
    second = await document(stack, "send", "--wait", "--timeout", "90", "--customer", "cus_1001", REFUND)
    assert second["status"] == "replied"
    assert [(t["status"], t["reason"]) for t in second["tools"]] == [
        ("error", "refund exceeds the order's remaining 0 cents")
    ]
    shown = await corral(stack, "show", second["conversation"])
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "payments refund -> error: refund exceeds the order's remaining 0 cents" in out
    assert '"order_id": "1001"' in out
    assert "  path:      triage -> payments (0.93) -> account_manager (0.90)" in out
    as_json = await document(stack, "show", second["conversation"])
    assert [(t["tool"], t["status"], t["step"]) for t in as_json["tools"]] == [("refund", "error", 2)]

    rolled = await corral(stack, "rollback", first["conversation"])
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    lines = rolled.stdout.splitlines()
    assert lines[0].startswith("refund undone by reverse_refund (reversed true, refund_id ")
    assert lines[-1] == f"rolled back {first['conversation']}: 1 undone of 1 calls"
    assert "{" not in rolled.stdout  # sentences, not a dict
    again = await corral(stack, "rollback", first["conversation"])
    assert again.returncode == 0
    assert again.stdout.startswith(f"nothing to roll back in {first['conversation']}")
    rows = await stack.sql(
        "SELECT reversed_at IS NOT NULL AS reversed FROM shop.refunds WHERE order_id='1001'"
    )
    assert [r["reversed"] for r in rows] == [True]


async def test_a_piped_approvals_table_prints_whole_ids_and_unknown_approvals_exit_2(stack: Stack) -> None:
    waiting = await document(
        stack,
        "send",
        "--wait",
        "--timeout",
        "90",
        "--customer",
        "cus_1001",
        "Please refund order 1002.",
        code=3,
    )
    assert waiting["status"] == "waiting"
    approval = waiting["approval_id"]
    listed = await corral(stack, "approvals")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["id", "conversation", "agent"]
    assert "│" not in listed.stdout and "…" not in listed.stdout  # no drawn table, nothing cut
    assert [row.split()[:4] for row in rows] == [[approval, waiting["conversation"], "payments", "refund"]]
    assert [a["id"] for a in await document(stack, "approvals")] == [approval]

    for command in (["approve", "a-nosuch"], ["deny", "a-nosuch", "--reason", "no"]):
        unknown = await corral(stack, *command)
        assert unknown.returncode == 2, unknown.stdout + unknown.stderr
        assert "no approval 'a-nosuch'" in unknown.stderr
    denied = await corral(stack, "deny", approval, "--reason", "not today")
    assert denied.returncode == 0, denied.stderr
    assert f"{approval} denied by" in denied.stdout


async def test_unknown_conversations_exit_2_and_leave_no_kill_switch(stack: Stack) -> None:
    for command in (["kill", "conversation", "c-nosuch"], ["rollback", "c-bogus"], ["show", "c-nosuch"]):
        done = await corral(stack, *command)
        assert done.returncode == 2, (command, done.stdout + done.stderr)
        assert f"no conversation '{command[-1]}'" in done.stderr
        assert "Traceback" not in done.stderr
    status = await document(stack, "status")
    assert all(k["target"] != "conversation" for k in status["kill_switches"]), status["kill_switches"]


async def test_status_shows_the_servers_and_a_killed_agent_as_killed_by_whom(stack: Stack) -> None:
    report = await document(stack, "status")
    assert report["running"] is True
    assert report["nats_url"] == stack.nats_url
    assert report["database_url"].startswith("postgresql://")
    killed = await corral(stack, "kill", "agent", "tech_support", "--reason", "bad deploy")
    assert killed.returncode == 0, killed.stderr
    try:
        report = await document(stack, "status")
        processes = {p["name"]: p for p in report["processes"]}
        assert processes["tech_support"]["state"] == "killed"
        by = processes["tech_support"]["killed"]["by"]
        assert by and processes["tech_support"]["killed"]["reason"] == "bad deploy"
        assert processes["triage"]["state"] == "running"
        assert [(k["key"], k["by"]) for k in report["kill_switches"]] == [("agent.tech_support", by)]
        text = await corral(stack, "status")
        assert text.returncode == 0
        row = next(line for line in text.stdout.splitlines() if line.startswith("tech_support "))
        assert f"killed by {by}: bad deploy" in row
        assert f"NATS:       {stack.nats_url}" in text.stdout
    finally:
        revived = await corral(stack, "revive", "agent", "tech_support")
        assert revived.returncode == 0, revived.stderr
    # Both in the audit chain, with the operator's name (as the API's are).
    audited = await stack.sql(
        "SELECT agent, action, outcome, detail FROM audit_log WHERE action IN ('kill.agent', 'revive.agent')"
        " ORDER BY id DESC LIMIT 2"
    )
    assert [tuple(r) for r in reversed(audited)] == [
        (by, "kill.agent", "applied", "tech_support"),
        (by, "revive.agent", "applied", "tech_support"),
    ]

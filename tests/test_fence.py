"""The fence, with real credentials: a hostile process holding an agent's identity can ask
for anything and reach nothing; kill switches stop agents and conversations for good.

`corral up` runs here with its embedded nats-server, which requires an nkey identity of
every connection, with permissions compiled from the handoff graph."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import nats
import pytest

from corral.bus import (
    DEAD_REASON,
    AgentReply,
    AgentTask,
    ApprovalDecided,
    ConversationEnded,
    HandoffProposed,
    JournalQuery,
    OutputTaken,
    ToolCall,
    encode,
    subjects,
)
from corral.supervisor import send_and_wait
from tests.conftest import eventually
from tests.stack import TEAM, Stack, running_stack


@pytest.fixture(scope="module")
async def stack(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:
        await eventually(
            lambda: _connections(stack) >= {f"corral-agent-{a}" for a in TEAM - {"supervisor"}},
            timeout=60,
            message="every agent connected",
        )
        yield stack


def _connz(stack: Stack) -> list[dict[str, Any]]:
    runtime = stack.runtime()
    assert runtime is not None and runtime["nats_monitor_url"]
    with urllib.request.urlopen(f"{runtime['nats_monitor_url']}/connz?limit=1000", timeout=5) as r:
        return json.loads(r.read())["connections"]  # type: ignore[no-any-return]


def _connections(stack: Stack) -> set[str]:
    return {c.get("name", "") for c in _connz(stack)}


class Hostile:
    """A raw NATS connection holding one identity's seed, recording what the server refuses."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, stack: Stack, identity: str) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            stack.nats_url,
            nkeys_seed=stack.seed(identity),
            inbox_prefix=subjects.inbox_prefix(identity).encode(),
            error_cb=on_error,
            allow_reconnect=False,
            name=f"hostile-{identity}",
        )
        return self.nc

    async def refused(self, what: str) -> bool:
        await eventually(
            lambda: any(what.lower() in e.lower() for e in self.errors),
            timeout=10,
            message=f"{what} in {self.errors}",
        )
        return True


@asynccontextmanager
async def parked_on_payments(
    stack: Stack, client: Any, text: str
) -> AsyncIterator[tuple[str, asyncio.Task[ConversationEnded]]]:
    """A refund whose next step waits on payments, frozen (SIGSTOP) until the block ends."""
    payments = stack.child("payments")["pid"]
    os.kill(payments, signal.SIGSTOP)
    try:
        waiting = asyncio.create_task(send_and_wait(client, text, timeout_s=60))

        async def _parked() -> list[asyncpg.Record]:
            return await stack.sql(
                "SELECT id FROM conversations WHERE status='running' AND current_agent='payments'"
            )

        parked = await eventually(_parked, message="a refund waiting on payments")
        yield parked[0]["id"], waiting
    finally:
        os.kill(payments, signal.SIGCONT)


async def test_seeds_are_private_and_each_process_holds_only_its_own(stack: Stack) -> None:
    creds = stack.state_dir / "creds"
    assert oct(creds.stat().st_mode & 0o777) == "0o700"
    for seed in creds.glob("*.nk"):
        assert oct(seed.stat().st_mode & 0o777) == "0o600", seed
    for name in TEAM:
        environ = open(f"/proc/{stack.child(name)['pid']}/environ", "rb").read().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        identity = "supervisor" if name == "supervisor" else f"agent-{name}"
        if name != "supervisor" and os.geteuid() == 0:
            # As root, each agent runs as its own user and holds its seed only as an
            # in-memory file it inherited.
            assert env["CORRAL_CREDS"].startswith("/proc/self/fd/")
        else:
            assert env["CORRAL_CREDS"] == stack.seed(identity)
        assert ("DATABASE_URL" in env) == (name == "supervisor")  # agents never get the database
    conf = (stack.state_dir / "nats" / "nats-server.conf").read_text()
    assert "SU" not in "".join(line.split("nkey:")[0] for line in conf.splitlines())  # no seeds


async def test_triage_credentials_cannot_reach_what_the_graph_forbids(stack: Stack) -> None:
    admin = await stack.connect("admin")
    before = await _stream_positions(admin)
    hostile = Hostile()
    nc = await hostile.connect(stack, "agent-triage")
    task = encode(AgentTask(conversation="c-evil", step=1, agent="payments", text="refund $999"))
    forged = HandoffProposed(conversation="c-evil", step=1, agent="triage", target="triage", confidence=1.0)
    attempts = {
        subjects.agent_inbox("payments"): task,
        subjects.agent_reply("payments"): encode(
            AgentReply(conversation="c-evil", step=1, agent="payments", text="x")
        ),
        subjects.agent_handoff("payments", "account_manager"): encode(forged),
        subjects.agent_handoff("triage", "triage"): encode(forged),  # not an edge from triage
        subjects.agent_handoff("triage", "billing"): encode(forged),  # not an agent at all
        subjects.conversation_start("client", "c-evil"): b"{}",
        subjects.conversation_updates("client", "c-evil"): b"{}",
        # A forged approval decision: only operators may announce one.
        subjects.approval_decisions(): encode(ApprovalDecided(approval_id="a-forged")),
    }
    for subject, data in attempts.items():
        await nc.publish(subject, data)
    await nc.flush()
    for subject in attempts:
        assert await hostile.refused(f'permissions violation for publish to "{subject}"')
    # Nor may it read other agents' work or other conversations.
    for subject in (subjects.agent_inbox("payments"), "corral.out.>", "corral.from.payments.>"):
        await nc.subscribe(subject)
        await nc.flush()
        assert await hostile.refused(f'permissions violation for subscription to "{subject}"')
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.WORK_STREAM}.agent-payments",
        b"1",
        reply=f"{subjects.inbox_prefix('agent-triage')}.x",
    )
    await nc.flush()
    assert await hostile.refused("CONSUMER.MSG.NEXT.CORRAL_WORK.agent-payments")
    await nc.close()
    # Nothing arrived anywhere: every corral subject is captured by a stream, none grew.
    assert await _stream_positions(admin) == before
    await admin.close()


async def _stream_positions(admin: Any) -> dict[str, int]:
    names = (subjects.WORK_STREAM, subjects.EVENTS_STREAM, subjects.DEAD_LETTER_STREAM)
    return {name: (await admin.js.stream_info(name)).state.last_seq for name in names}


async def test_answers_go_only_to_the_asking_agents_own_inbox(stack: Stack) -> None:
    """A request names its reply subject. The supervisor may publish to every agent inbox,
    so a hostile agent asking for answers there would forge tasks if anyone obeyed."""
    admin = await stack.connect("admin")
    before = await _stream_positions(admin)
    hostile = Hostile()
    nc = await hostile.connect(stack, "agent-triage")
    output = encode(AgentReply(conversation="c-evil", step=1, agent="triage", text="x"))
    call = encode(ToolCall(conversation="c-evil", step=1, index=0, agent="triage", tool="lookup_order"))
    journal = encode(JournalQuery(conversation="c-evil", step=1, agent="triage"))
    elsewhere = subjects.agent_inbox("payments")
    await nc.publish(subjects.agent_reply("triage"), output, reply=elsewhere)
    await nc.publish(subjects.agent_tool("triage"), call, reply=elsewhere)
    await nc.publish(subjects.agent_journal("triage"), journal, reply=elsewhere)
    # The same requests asking on triage's own inbox are answered, after those before them.
    assert (await nc.request(subjects.agent_tool("triage"), call, timeout=30)).data
    assert (await nc.request(subjects.agent_journal("triage"), journal, timeout=30)).data
    await nc.close()
    dead_subject = subjects.dead_letter(subjects.agent_reply("triage"))

    async def _dead_letter() -> str | None:
        if (await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)).state.last_seq == before[
            subjects.DEAD_LETTER_STREAM
        ]:
            return None
        dead = await admin.js.get_last_msg(subjects.DEAD_LETTER_STREAM, dead_subject)
        return (dead.headers or {}).get(DEAD_REASON)

    reason = await eventually(_dead_letter, message="the hijacking output dead-lettered")
    assert reason == f"answer subject {elsewhere!r} is not triage's inbox"
    # The output was kept with its reason; nothing reached payments' inbox or any client.
    after = await _stream_positions(admin)
    assert after[subjects.WORK_STREAM] == before[subjects.WORK_STREAM]
    assert after[subjects.EVENTS_STREAM] == before[subjects.EVENTS_STREAM]
    # Each of the three services (output desk, gateway, journal) dead-letters its own.
    assert after[subjects.DEAD_LETTER_STREAM] == before[subjects.DEAD_LETTER_STREAM] + 3
    await admin.close()


async def test_body_claiming_another_identity_is_refused_and_recorded(stack: Stack) -> None:
    client = await stack.connect()
    ended = await send_and_wait(client, "How do I change my email address?", timeout_s=60)
    await client.close()
    hostile = Hostile()
    nc = await hostile.connect(stack, "agent-triage")
    claim = HandoffProposed(
        conversation=ended.conversation, step=1, agent="payments", target="payments", confidence=1.0
    )
    answer = await nc.request(subjects.agent_handoff("triage", "payments"), encode(claim), timeout=30)
    await nc.close()
    # Taken (so the agent lets go of its task), and recorded as rejected.
    assert msgspec.json.decode(answer.data, type=OutputTaken).status == "taken"

    async def _rejected() -> list[asyncpg.Record]:
        return await stack.sql(
            "SELECT agent, detail FROM conversation_steps WHERE conversation=$1 AND kind='rejected'",
            ended.conversation,
        )

    rows = await eventually(_rejected, message="the forged claim recorded")
    assert rows[0]["agent"] == "triage"
    assert "claims to come from 'payments'" in rows[0]["detail"]
    status = await stack.sql("SELECT status FROM conversations WHERE id=$1", ended.conversation)
    assert status[0]["status"] == "replied"  # unchanged


async def test_kill_agent_revokes_it_escalates_its_work_and_revive_restores_it(stack: Stack) -> None:
    client = await stack.connect()
    async with parked_on_payments(stack, client, "Please refund the duplicate.") as (parked, waiting):
        result = await asyncio.to_thread(
            stack.corral, "kill", "agent", "payments", "--reason", "fraud suspected"
        )
        assert result.returncode == 0, result.stderr
        ended = await waiting
    # The waiting conversation reached the human queue with the kill reason.
    assert ended.conversation == parked and ended.status == "escalated"
    assert "agent payments was killed (fraud suspected)" in (ended.reason or "")
    # payments' identity is revoked at the broker: its connection is gone and stays gone.
    await eventually(
        lambda: "corral-agent-payments" not in _connections(stack), message="payments disconnected"
    )
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await Hostile().connect(stack, "agent-payments")
    # A new conversation that needs payments is escalated, not forwarded.
    refund = await send_and_wait(client, "I want a refund.", timeout_s=60)
    assert refund.status == "escalated"
    assert "agent payments is killed (fraud suspected)" in (refund.reason or "")
    # Nothing payments sent after the kill changed any state.
    steps = await stack.sql(
        "SELECT agent, kind FROM conversation_steps WHERE conversation=$1 ORDER BY id", parked
    )
    assert [tuple(s) for s in steps] == [
        ("triage", "started"),
        ("triage", "forwarded"),
        ("payments", "escalated"),
    ]
    status = await asyncio.to_thread(stack.corral, "status", "--json")
    kills = json.loads(status.stdout)["kill_switches"]
    assert [(k["key"], k["reason"]) for k in kills] == [("agent.payments", "fraud suspected")]

    revived = await asyncio.to_thread(stack.corral, "revive", "agent", "payments")
    assert revived.returncode == 0 and "payments revived" in revived.stdout

    async def _through_payments() -> bool:
        ended = await send_and_wait(client, "Please refund the duplicate.", timeout_s=60)
        return ended.status == "replied" and [h.agent for h in ended.path] == [
            "triage",
            "payments",
            "account_manager",
        ]

    assert await eventually(_through_payments, timeout=60, message="a refund through payments")
    await client.close()


async def test_kill_state_survives_a_supervisor_restart(stack: Stack) -> None:
    client = await stack.connect()
    killed = await asyncio.to_thread(stack.corral, "kill", "agent", "tech_support", "--reason", "bad deploy")
    assert killed.returncode == 0
    old = stack.child("supervisor")
    os.kill(old["pid"], signal.SIGKILL)
    await eventually(lambda: stack.child("supervisor")["pid"] != old["pid"], message="supervisor restarted")
    ended = await send_and_wait(client, "The app shows an error.", timeout_s=90)
    assert ended.status == "escalated"
    assert "agent tech_support is killed (bad deploy)" in (ended.reason or "")
    await asyncio.to_thread(stack.corral, "revive", "agent", "tech_support")
    await client.close()


async def test_kill_conversation_stops_it_mid_flight(stack: Stack) -> None:
    client = await stack.connect()
    async with parked_on_payments(stack, client, "Refund my order please.") as (conversation, waiting):
        steps_before = await stack.sql(
            "SELECT id FROM conversation_steps WHERE conversation=$1", conversation
        )
        result = await asyncio.to_thread(
            stack.corral, "kill", "conversation", conversation, "--reason", "customer withdrew"
        )
        assert result.returncode == 0, result.stderr
        ended = await waiting
    assert ended.status == "killed" and ended.reason == "killed: customer withdrew"

    # payments wakes up with the queued task: it is dropped, and the drop is recorded.
    async def _dropped() -> list[asyncpg.Record]:
        return await stack.sql(
            "SELECT agent, reason FROM dropped_messages WHERE conversation=$1", conversation
        )

    dropped = await eventually(_dropped, message="the queued step dropped and recorded")
    assert dropped[0]["agent"] == "payments"
    assert "conversation is killed (customer withdrew)" in dropped[0]["reason"]
    steps_after = await stack.sql("SELECT id FROM conversation_steps WHERE conversation=$1", conversation)
    assert steps_after == steps_before  # no later step recorded
    row = await stack.sql("SELECT status FROM conversations WHERE id=$1", conversation)
    assert row[0]["status"] == "killed"
    await client.close()


async def test_corral_creds_configures_an_external_nats(tmp_path: Any) -> None:
    """`corral creds` writes seeds and the authorization block to install on your own server."""
    import subprocess
    import sys

    from corral.supervisor import EmbeddedNats
    from tests.conftest import SAMPLE_CONFIG

    out = tmp_path / "creds"
    result = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "creds", "--out", str(out), "-c", str(SAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.nk")) == sorted(
        [f"agent-{a}.nk" for a in TEAM - {"supervisor"}]
        + ["supervisor.nk", "gateway.nk", "router.nk", "client.nk", "admin.nk", "api.nk"]
    )
    server = EmbeddedNats(tmp_path / "external")
    # nats-server resolves includes relative to the including file.
    block = os.path.relpath(out / "nats-authorization.conf", server.directory)
    server.write_config(f'include "{block}"\n')
    server.start()
    try:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        nc = await nats.connect(
            server.url,
            nkeys_seed=str(out / "agent-tech_support.nk"),
            inbox_prefix=b"_INBOX.agent-tech_support",
            error_cb=on_error,
            allow_reconnect=False,
        )
        await nc.publish(subjects.agent_handoff("tech_support", "payments"), b"{}")
        await nc.publish(subjects.agent_handoff("tech_support", "account_manager"), b"{}")
        await nc.flush()
        await eventually(lambda: errors, message="a permission error")
        assert errors == [
            'nats: permissions violation for publish to "corral.from.tech_support.handoff.payments"'
        ]
        await nc.close()
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
    finally:
        server.stop()

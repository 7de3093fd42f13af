"""Poison: every input ends somewhere. On a stack started with `corral up`, a hostile client
or a hostile process holding triage's seed sends what used to stop the supervisor or
leave a conversation running forever; each now ends its conversation with the reason the
client sees, or is dead-lettered with its reason, and the supervisor keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg
import msgspec
import nats
import pytest

from corral.bus import (
    DEAD_REASON,
    DEAD_TRUNCATED,
    AgentReply,
    AgentWaiting,
    Bus,
    ClientUpdate,
    ConversationEnded,
    ConversationStart,
    OutputTaken,
    encode,
    subjects,
)
from corral.supervisor import send_and_wait
from corral.supervisor.core._client import new_conversation_id, watching
from tests.conftest import eventually
from tests.stack import Stack, running_stack


@pytest.fixture(scope="module")
async def stack(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:
        yield stack


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Bus]:
    bus = await stack.connect("client")
    yield bus
    await bus.close()


@pytest.fixture
async def triage_seed(stack: Stack) -> AsyncIterator[nats.NATS]:
    """A hostile connection holding triage's seed."""
    nc = await nats.connect(
        stack.nats_url,
        nkeys_seed=stack.seed("agent-triage"),
        inbox_prefix=subjects.inbox_prefix("agent-triage").encode(),
        allow_reconnect=False,
        name="hostile-agent-triage",
    )
    yield nc
    await nc.close()


@contextmanager
def frozen(stack: Stack, name: str) -> Iterator[None]:
    """``name``'s process stopped (SIGSTOP) until the block ends: its tasks wait in its inbox."""
    pid = stack.child(name)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@asynccontextmanager
async def at_triage(
    stack: Stack, client: Bus, text: str
) -> AsyncIterator[tuple[str, asyncio.Future[ClientUpdate]]]:
    """A conversation at triage's step 1 (triage frozen), and the future of its outcome."""
    conversation = new_conversation_id()
    with frozen(stack, "triage"):
        async with watching(client, conversation) as done:
            task = asyncio.create_task(send_and_wait(client, text, conversation=conversation, timeout_s=60))

            async def _running() -> bool:
                rows = await stack.sql("SELECT status FROM conversations WHERE id=$1", conversation)
                return bool(rows) and rows[0]["status"] == "running"

            await eventually(_running, message="the conversation running at triage")
            try:
                yield conversation, done
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[Bus]:
    bus = await stack.connect("admin")
    yield bus
    await bus.close()


async def _dead_letter(admin: Bus, subject: str) -> tuple[str, dict[str, str]]:
    """The newest dead letter of ``subject``: its reason, and all its headers."""
    dead = await admin.js.get_last_msg(subjects.DEAD_LETTER_STREAM, subjects.dead_letter(subject))
    headers = dict(dead.headers or {})
    return headers[DEAD_REASON], headers


async def _outcome(done: asyncio.Future[ClientUpdate]) -> ConversationEnded:
    ended = await asyncio.wait_for(done, 60)
    assert isinstance(ended, ConversationEnded)
    return ended


async def test_an_oversized_start_is_refused_and_the_supervisor_keeps_serving(
    stack: Stack, client: Bus, admin: Bus
) -> None:
    """1,048,480 bytes: under the server's 1 MiB, but its task with headers was not, and the
    server closed the supervisor's connection for good."""
    supervisor_pid = stack.child("supervisor")["pid"]
    conversation = new_conversation_id()
    subject = subjects.conversation_start("client", conversation)
    start = ConversationStart(conversation=conversation, text="")
    text = "a" * (1_048_480 - len(encode(start)))
    body = encode(ConversationStart(conversation=conversation, text=text))
    assert len(body) == 1_048_480
    async with watching(client, conversation) as done:
        await client.js.publish(subject, body)
        ended = await _outcome(done)
    assert ended.status == "refused"
    assert ended.reason == (
        f"PoisonMessageError: conversation start refused: text of {len(text)} bytes exceeds "
        "limits.customer_text_bytes (16384)"
    )
    reason, headers = await _dead_letter(admin, subject)
    assert reason == ended.reason
    assert int(headers[DEAD_TRUNCATED]) == len(body)
    # The supervisor is the same process, still connected and serving.
    assert stack.child("supervisor")["pid"] == supervisor_pid
    after = await send_and_wait(client, "How do I change my email address?", timeout_s=60)
    assert after.status == "replied"
    rows = await stack.sql("SELECT count(*) AS n FROM conversations WHERE id=$1", conversation)
    assert rows[0]["n"] == 0  # nothing was taken


async def test_an_id_outside_the_pattern_is_refused_at_the_edge(
    stack: Stack, client: Bus, admin: Bus
) -> None:
    """`ü` was accepted, and `corral kill conversation ü` then failed with InvalidKeyError."""
    subject = subjects.conversation_start("client", "ü")
    async with watching(client, "ü") as done:
        await client.js.publish(subject, encode(ConversationStart(conversation="ü", text="hello")))
        ended = await _outcome(done)
    assert ended.status == "refused"
    assert "conversation id 'ü' must match ^[A-Za-z0-9_-]{1,64}$" in (ended.reason or "")
    reason, _ = await _dead_letter(admin, subject)
    assert reason == ended.reason.replace("ü", "\\xfc")  # headers are ASCII
    assert await stack.sql("SELECT id FROM conversations WHERE id='ü'") == []
    # The operator's command says why instead of failing on the kill-switch key.
    killed = await asyncio.to_thread(stack.corral, "kill", "conversation", "ü")
    assert killed.returncode == 2, killed.stdout + killed.stderr
    assert "conversation id 'ü' must match ^[A-Za-z0-9_-]{1,64}$" in killed.stderr


async def test_a_reply_with_a_nul_character_escalates_its_conversation(
    stack: Stack, client: Bus, admin: Bus, triage_seed: nats.NATS
) -> None:
    """PostgreSQL refused the save, the agent then acked its task: running forever."""
    async with at_triage(stack, client, "How do I change my email address?") as (conversation, done):
        reply = AgentReply(conversation=conversation, step=1, agent="triage", text="done\x00")
        answer = await triage_seed.request(subjects.agent_reply("triage"), encode(reply), timeout=30)
        taken = msgspec.json.decode(answer.data, type=OutputTaken)
        ended = await _outcome(done)
    assert taken.status == "refused"
    assert taken.reason == "PoisonMessageError: reply contains a NUL character"
    assert ended.status == "escalated"
    assert ended.reason == (
        "output of triage at step 1 refused: PoisonMessageError: reply contains a NUL character;"
        " escalated to a human"
    )
    reason, _ = await _dead_letter(admin, subjects.agent_reply("triage"))
    assert reason == taken.reason


async def test_an_oversized_reply_escalates_its_conversation_and_the_client_hears(
    stack: Stack, client: Bus, admin: Bus, triage_seed: nats.NATS
) -> None:
    """1,048,469 bytes with triage's seed: saved as replied, but the outcome could not be
    published, and the supervisor's connection was closed."""
    async with at_triage(stack, client, "How do I change my email address?") as (conversation, done):
        empty = encode(AgentReply(conversation=conversation, step=1, agent="triage", text=""))
        text = "r" * (1_048_469 - len(empty))
        body = encode(AgentReply(conversation=conversation, step=1, agent="triage", text=text))
        assert len(body) == 1_048_469
        answer = await triage_seed.request(subjects.agent_reply("triage"), body, timeout=30)
        taken = msgspec.json.decode(answer.data, type=OutputTaken)
        ended = await _outcome(done)
    why = f"reply of {len(text)} bytes exceeds limits.reply_text_bytes (32768)"
    assert taken.status == "refused" and taken.reason == f"PoisonMessageError: {why}"
    assert ended.status == "escalated" and why in (ended.reason or "")
    assert ended.reply is None
    _, headers = await _dead_letter(admin, subjects.agent_reply("triage"))
    assert int(headers[DEAD_TRUNCATED]) == len(body)


async def test_an_invented_approval_escalates_instead_of_waiting_forever(
    stack: Stack, client: Bus, admin: Bus, triage_seed: nats.NATS
) -> None:
    async with at_triage(stack, client, "How do I change my email address?") as (conversation, done):
        waiting = AgentWaiting(
            conversation=conversation, step=1, agent="triage", approval_id="apr-invented", tool="refund"
        )
        answer = await triage_seed.request(subjects.agent_waiting("triage"), encode(waiting), timeout=30)
        taken = msgspec.json.decode(answer.data, type=OutputTaken)
        ended = await _outcome(done)
    why = f"approval 'apr-invented' was never requested for triage in conversation {conversation}"
    assert taken.status == "refused" and why in taken.reason
    assert ended.status == "escalated" and why in (ended.reason or "")
    rows = await stack.sql("SELECT status, approval_id FROM conversations WHERE id=$1", conversation)
    assert rows[0]["status"] == "escalated" and rows[0]["approval_id"] is None


async def test_an_approval_decided_before_the_wait_arrives_resumes_the_step(
    stack: Stack, client: Bus, triage_seed: nats.NATS
) -> None:
    """The operator approves before the step's AgentWaiting is taken: the ApprovalDecided
    found nothing waiting, and the wait recorded after it waited forever."""
    async with at_triage(stack, client, "How do I change my email address?") as (conversation, _):
        await stack.sql(
            "INSERT INTO approvals (id, action_hash, conversation, customer, agent, tool, arguments,"
            " approver, status, decided_by, decided_at, expires_at) VALUES ('a-early', 'h', $1, '',"
            " 'triage', 'lookup_order', '{}', 'human', 'approved', 'alice', now(), now() + interval '1 h')",
            conversation,
        )
        waiting = AgentWaiting(
            conversation=conversation, step=1, agent="triage", approval_id="a-early", tool="lookup_order"
        )
        answer = await triage_seed.request(subjects.agent_waiting("triage"), encode(waiting), timeout=30)
        assert msgspec.json.decode(answer.data, type=OutputTaken).status == "taken"

        async def _resumed() -> list[asyncpg.Record]:
            return await stack.sql(
                "SELECT detail FROM conversation_steps WHERE conversation=$1 AND kind='resumed'",
                conversation,
            )

        resumed = await eventually(_resumed, message="the step resumed on the earlier decision")
    assert resumed[0]["detail"] == "approval a-early approved"


async def test_undecodable_outputs_are_refused_at_once_and_dead_lettered(
    stack: Stack, client: Bus, admin: Bus, triage_seed: nats.NATS
) -> None:
    """100,000 levels of nesting (a RecursionError: no answer, no dead letter) and a step of
    2**40 (an integer overflow at PostgreSQL, answered "retry")."""
    ended = await send_and_wait(client, "How do I change my email address?", timeout_s=60)
    reply = encode(AgentReply(conversation=ended.conversation, step=1, agent="triage", text="hi"))
    nested = reply[:-1] + b',"junk":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = await triage_seed.request(subjects.agent_reply("triage"), nested, timeout=30)
    taken = msgspec.json.decode(answer.data, type=OutputTaken)
    assert taken.status == "refused"
    assert taken.reason.startswith("decode error: maximum recursion depth exceeded")
    reason, _ = await _dead_letter(admin, subjects.agent_reply("triage"))
    assert reason == taken.reason

    overflow = reply.replace(b'"step":1', b'"step":%d' % 2**40)
    assert overflow != reply
    answer = await triage_seed.request(subjects.agent_reply("triage"), overflow, timeout=30)
    taken = msgspec.json.decode(answer.data, type=OutputTaken)
    assert taken.status == "refused"
    assert taken.reason == "decode error: Expected `int` <= 2147483647 - at `$.step`"
    reason, _ = await _dead_letter(admin, subjects.agent_reply("triage"))
    assert reason == taken.reason
    # The conversation they named is as it was.
    rows = await stack.sql("SELECT status FROM conversations WHERE id=$1", ended.conversation)
    assert rows[0]["status"] == "replied"


async def test_the_dead_letter_stream_is_bounded(stack: Stack, admin: Bus) -> None:
    info = await admin.js.stream_info(subjects.DEAD_LETTER_STREAM)
    assert info.config.max_bytes == 256 * 1024 * 1024
    assert info.config.max_age == 30 * 24 * 3600
    assert info.config.max_msg_size == 128 * 1024

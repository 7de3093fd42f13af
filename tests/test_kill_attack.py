"""The kill switch against an agent that fights it: holding payments' own seed, an attacker
keeps refunding while it tries to blind the processes that enforce kills. After
`corral kill agent payments` returns, nothing it does changes any state.

`corral up` runs here on the embedded defaults, as a user would run it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest

from corral.bus import ToolCall, ToolResult, encode, subjects
from tests.conftest import eventually
from tests.stack import Stack, running_stack

_KV_STREAM = f"KV_{subjects.CONTROL_BUCKET}"
_result = msgspec.json.Decoder(ToolResult)


@pytest.fixture(scope="module")
async def stack(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), module_database_url, None) as stack:

        async def _migrated() -> bool:
            rows = await stack.sql("SELECT to_regclass('shop.refunds') IS NOT NULL AS ok")
            return bool(rows[0]["ok"])

        await eventually(_migrated, timeout=60, message="the supervisor migrated the database")
        yield stack


class Attacker:
    """A raw connection with one identity's seed that records what the broker refuses."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.closed = asyncio.Event()
        self.closed_at = 0.0

    async def connect(self, stack: Stack, identity: str) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        async def on_closed() -> None:
            self.closed_at = time.monotonic()
            self.closed.set()

        return await nats.connect(
            stack.nats_url,
            nkeys_seed=stack.seed(identity),
            inbox_prefix=subjects.inbox_prefix(identity).encode(),
            error_cb=on_error,
            closed_cb=on_closed,
            allow_reconnect=False,
            name=f"attacker-{identity}",
        )

    async def refused(self, what: str) -> None:
        await eventually(
            lambda: any(what.lower() in e.lower() for e in self.errors),
            timeout=10,
            message=f"{what!r} in {self.errors}",
        )


def _watcher_consumers(stack: Stack) -> list[str]:
    """The kill-switch watchers' consumer names, as the embedded server's monitoring endpoint
    gives them to anyone on the machine (when it is on)."""
    runtime = stack.runtime() or {}
    if not runtime.get("nats_monitor_url"):
        return []
    try:
        url = f"{runtime['nats_monitor_url']}/jsz?consumers=true"
        with urllib.request.urlopen(url, timeout=5) as r:
            jsz = json.loads(r.read())
    except OSError:
        return []
    return [
        consumer["name"]
        for account in jsz.get("account_details", [])
        for stream in account.get("stream_detail", [])
        if stream["name"] == _KV_STREAM
        for consumer in stream.get("consumer_detail", [])
    ]


def _blinding_requests(watchers: list[str] = ()) -> dict[str, bytes]:  # type: ignore[assignment]
    """What an agent would send to delete the kill-switch watchers' consumers, or to make the
    server deliver the control stream (or anything) to subjects it may not publish to."""
    aimed = json.dumps(
        {
            "stream_name": _KV_STREAM,
            "config": {
                "deliver_subject": subjects.conversation_updates("client", "c-1"),
                "ack_policy": "none",
                "deliver_policy": "all",
            },
        }
    ).encode()
    return {
        f"$JS.API.CONSUMER.LIST.{_KV_STREAM}": b"",
        f"$JS.API.CONSUMER.NAMES.{_KV_STREAM}": b"",
        f"$JS.API.CONSUMER.DELETE.{_KV_STREAM}.watcher": b"",
        f"$JS.API.CONSUMER.CREATE.{_KV_STREAM}": aimed,
        f"$JS.API.CONSUMER.CREATE.{_KV_STREAM}.evil": aimed,
        f"$JS.API.CONSUMER.DURABLE.CREATE.{_KV_STREAM}.evil": aimed,
        f"$JS.API.STREAM.INFO.{_KV_STREAM}": b"",
        f"$JS.API.CONSUMER.DELETE.{subjects.WORK_STREAM}.supervisor": b"",
        **{f"$JS.API.CONSUMER.DELETE.{_KV_STREAM}.{name}": b"" for name in watchers},
    }


async def test_agents_cannot_touch_or_aim_consumers(stack: Stack) -> None:
    attacker = Attacker()
    nc = await attacker.connect(stack, "agent-triage")
    requests = _blinding_requests()
    for subject, body in requests.items():
        await nc.publish(subject, body, reply=f"{subjects.inbox_prefix('agent-triage')}.x")
    await nc.flush()
    for subject in requests:
        await attacker.refused(f'permissions violation for publish to "{subject}"')
    await nc.close()


async def _park_refunds(stack: Stack, count: int) -> list[tuple[str, int]]:
    """``count`` refund conversations of cus_1001 waiting for payments' step, which payments
    (frozen by the caller) never takes: the attacker takes them instead."""
    client = await stack.connect()
    from corral.supervisor import send_and_wait

    starts = [
        asyncio.create_task(
            send_and_wait(client, "Refund my order please.", customer="cus_1001", timeout_s=120)
        )
        for _ in range(count)
    ]

    async def _parked() -> list[tuple[str, int]] | None:
        rows = await stack.sql(
            "SELECT id, step FROM conversations WHERE status='running' AND current_agent='payments'"
        )
        return [(r["id"], r["step"]) for r in rows] if len(rows) >= count else None

    parked = await eventually(_parked, timeout=60, message=f"{count} refunds waiting on payments")
    for task in starts:
        task.cancel()
    await asyncio.gather(*starts, return_exceptions=True)
    await client.close()
    return parked


async def _effects(stack: Stack) -> int:
    rows = await stack.sql("SELECT count(*) AS n FROM shop.refunds")
    return int(rows[0]["n"])


async def _quiet(stack: Stack) -> bool:
    """No transaction of corral's is open in PostgreSQL but ours (every call decided)."""
    rows = await stack.sql(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
    )
    return int(rows[0]["n"]) == 0


@dataclasses.dataclass
class _HostilePayments:
    """payments' stolen seed in an attacker's hands: refunds on every parked step, each call
    a new idempotency key, while it floods the kill watchers with blinding requests."""

    stack: Stack
    nc: nats.aio.client.Client
    parked: list[tuple[str, int]]
    applied: list[float] = dataclasses.field(default_factory=list)
    attempts: list[float] = dataclasses.field(default_factory=list)
    unanswered: list[float] = dataclasses.field(default_factory=list)

    async def refund_forever(self) -> None:
        # Round-robin over the parked steps: each call has its own idempotency key.
        for index, (conversation, step) in itertools.product(range(8), self.parked):
            call = ToolCall(
                conversation=conversation,
                step=step,
                index=index,
                agent="payments",
                tool="refund",
                arguments={"order_id": "1001", "amount_cents": 1, "reason": f"r{index}"},
            )
            self.attempts.append(time.monotonic())
            try:
                reply = await self.nc.request(subjects.agent_tool("payments"), encode(call), timeout=10)
            except Exception:
                if self.nc.is_closed:
                    return
                self.unanswered.append(time.monotonic())
                continue
            if _result.decode(reply.data).status == "ok":
                self.applied.append(time.monotonic())

    async def blind_forever(self) -> None:
        while not self.nc.is_closed:
            watchers = await asyncio.to_thread(_watcher_consumers, self.stack)
            for subject, body in _blinding_requests(watchers).items():
                if self.nc.is_closed:
                    return
                try:
                    await self.nc.publish(subject, body, reply=f"{subjects.inbox_prefix('agent-payments')}.x")
                    await self.nc.flush(timeout=1)
                except Exception:
                    return


async def test_no_side_effect_after_kill_returns_while_the_agent_fights_it(stack: Stack) -> None:
    payments = stack.child("payments")["pid"]
    os.kill(payments, signal.SIGSTOP)  # the real payments never runs these steps
    try:
        # Enough keys that the attack is still going when the kill lands (each one a new
        # idempotency key; caps per step and per resource bound what each step may do).
        parked = await _park_refunds(stack, 100)
        attacker = Attacker()
        nc = await attacker.connect(stack, "agent-payments")
        hostile = _HostilePayments(stack, nc, parked)
        applied, attempts, unanswered = hostile.applied, hostile.attempts, hostile.unanswered
        attack = [asyncio.create_task(hostile.refund_forever()), asyncio.create_task(hostile.blind_forever())]
        await eventually(lambda: len(applied) >= 3, message="the attacker refunding")
        started = time.monotonic()
        killed = await asyncio.to_thread(stack.corral, "kill", "agent", "payments", "--reason", "attack")
        returned = time.monotonic()
        assert killed.returncode == 0, killed.stdout + killed.stderr
        at_kill = await _effects(stack)

        # The attack goes on until the broker closes the connection, or its requests go
        # unanswered (the broker keeps a revoked connection open but delivers nothing from
        # it), or for a good while after the kill: whatever it still sends changes nothing.
        await eventually(
            lambda: (
                attacker.closed.is_set()
                or attack[0].done()  # it made every call it had
                or len([t for t in unanswered if t > returned]) >= 2
                or len([t for t in attempts if t > returned]) >= 50
            ),
            timeout=60,
            message="the broker closing the connection, or the attack going on after the kill",
        )
        closed = attacker.closed.is_set()
        if not closed:
            await nc.close()
        await asyncio.gather(*attack, return_exceptions=True)
        await eventually(lambda: _quiet(stack), message="no tool call in flight")
        assert await _effects(stack) == at_kill, "a refund committed after `corral kill agent` returned"
        assert not [t for t in applied if t > returned], "a call was answered ok after the kill returned"
        assert [t for t in attempts if t > started], "the attack had ended before the kill"
        # How long the broker took to close the connection: measured for the record.
        print(
            f"\nkill: command {returned - started:.2f} s; "
            + (
                f"connection closed {attacker.closed_at - started:.2f} s after the command started, "
                f"{attacker.closed_at - returned:.2f} s after it returned; "
                if closed
                else f"the broker kept the connection open ({len(unanswered)} calls unanswered,"
                f" {len([t for t in attempts if t > returned])} made after the kill); "
            )
            + f"{len(applied)} refunds before the kill"
        )
        # Its reconnects are refused too.
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the server closes it
            again = await Attacker().connect(stack, "agent-payments")
            await again.request(subjects.agent_tool("payments"), b"{}", timeout=5)
    finally:
        os.kill(payments, signal.SIGCONT)
        await asyncio.to_thread(stack.corral, "revive", "agent", "payments")

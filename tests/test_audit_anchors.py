"""The audit chain against a database superuser: signed anchors on a real JetStream show a
forged, a rewritten and a truncated log, naming the first bad record; and the supervisor's
role cannot change the log at all."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import msgspec
import nkeys
import pytest
import yaml

from corral.bus import Bus, BusConfig, connect
from corral.supervisor import send_and_wait
from corral.supervisor.audit._anchor_check import verify_anchored
from corral.supervisor.audit._anchors import (
    ANCHOR_STREAM,
    ANCHOR_SUBJECT,
    AuditAnchor,
    AuditAnchorer,
    read_anchors,
)
from corral.supervisor.audit._audit import append_audit, chain_hash, verify_audit
from corral.supervisor.stack._embedded import EmbeddedNats
from corral.supervisor.store._roles import SUPERVISOR_ROLE, supervisor_login
from corral.supervisor.store._store import Store
from tests.conftest import REPO, SAMPLE_CONFIG, eventually
from tests.stack import running_stack
from tests.test_audit import ENTRY


def _seed(path: Path) -> Path:
    path.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    return path


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The attacker: the database's owner, a superuser, who may disable the trigger."""
    await (await Store.open(database_url, min_size=1, max_size=1)).close()
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def supervisor_pool(owner: asyncpg.Connection, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The supervisor's connections, as the restricted role the launcher hands it."""
    dsn = await supervisor_login(database_url)
    assert dsn is not None and urlsplit(dsn).username == SUPERVISOR_ROLE
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    bus = await connect(BusConfig(servers=[nats_server.url], name="test-anchors", reconnect_forever=False))
    yield bus
    await bus.close()


async def _append(
    pool: asyncpg.Pool, n: int, anchorer: AuditAnchorer | None = None, *, witness: AuditAnchorer | None = None
) -> list[int]:
    """``n`` legitimate records, each anchored right away (as if the interval were short)."""
    ids = []
    for i in range(n):
        async with pool.acquire() as conn, conn.transaction():
            entry = replace(ENTRY, outcome=f"ok {i}")
            ids.append(await append_audit(conn, entry, witness=witness.witness if witness else None))
        if anchorer is not None:
            await anchorer.anchor("interval")
    return ids


async def _verify(bus: Bus, conn: asyncpg.Connection, key: str) -> tuple[int | None, str]:
    anchors, forged = await read_anchors(bus.js, [key])
    assert forged == 0
    result = await verify_anchored(conn, anchors)
    return result.first_broken, result.problem or ""


async def test_the_supervisors_role_cannot_change_the_log(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool
) -> None:
    [record] = await _append(supervisor_pool, 1)  # it appends through the function
    async with supervisor_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
        await conn.execute(
            "INSERT INTO dropped_messages (conversation, agent, step, kind, reason)"
            " VALUES ('c', 'a', 1, 'k', 'r')"
        )
        for statement in (
            "UPDATE audit_log SET detail = 'changed'",
            f"DELETE FROM audit_log WHERE id = {record}",
            "TRUNCATE audit_log",
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
            "ALTER TABLE audit_log DISABLE TRIGGER ALL",
            "ALTER TABLE audit_log ADD COLUMN note text",
            "INSERT INTO audit_log (agent, credential_id, on_behalf_of, conversation, action,"
            " arguments_digest, decision, outcome, prev_hash, hash)"
            f" VALUES ('x','x','x','x','x','x','x','x','{'0' * 64}','{'1' * 64}')",
            "DROP FUNCTION corral_audit_append",
            "CREATE OR REPLACE FUNCTION audit_log_reject_change() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    assert (await verify_audit(owner)).count == 1


async def test_a_forged_record_appended_through_the_function_is_named(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        await _append(supervisor_pool, 4, anchorer)
    # The supervisor has stopped (its shutdown anchor counted 4); the attacker appends.
    async with owner.transaction():
        forged = await append_audit(owner, replace(ENTRY, action="tool:refund", detail="refund 900"))
    assert (await verify_audit(owner)).intact  # the chain alone cannot tell
    first, problem = await _verify(bus, owner, anchorer.public_key)
    assert first == forged
    assert problem.startswith("forged"), problem


async def test_a_record_edited_and_the_chain_recomputed_is_named(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        ids = await _append(supervisor_pool, 6, anchorer)
        await _rewrite(owner, ids[2], detail="refund 5 (was 500)")
        assert (await verify_audit(owner)).intact  # the chain alone cannot tell
        first, problem = await _verify(bus, owner, anchorer.public_key)
    assert first == ids[2]
    assert problem.startswith("rewritten"), problem


async def test_the_newest_three_records_deleted_are_named(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        ids = await _append(supervisor_pool, 6, anchorer)
    await owner.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    await owner.execute("DELETE FROM audit_log WHERE id = ANY($1::bigint[])", ids[3:])
    await owner.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
    assert (await verify_audit(owner)).intact  # the chain alone cannot tell
    first, problem = await _verify(bus, owner, anchorer.public_key)
    assert first == ids[3]
    assert problem.startswith("truncated"), problem


async def test_a_record_forged_while_the_supervisor_runs_is_named_when_its_appends_are_witnessed(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed, witnessing=True) as anchorer:
        await _append(supervisor_pool, 3, witness=anchorer)
        await anchorer.anchor("interval")
        async with owner.transaction():
            forged = await append_audit(owner, replace(ENTRY, detail="refund 900"))
        await _append(supervisor_pool, 2, witness=anchorer)
        await anchorer.anchor("interval")  # it counts the forged record, and does not vouch for it
    assert (await verify_audit(owner)).intact  # the chain alone cannot tell
    first, problem = await _verify(bus, owner, anchorer.public_key)
    assert first == forged
    assert problem.startswith("forged: appended while the supervisor ran"), problem


async def test_a_supervisor_that_died_unannounced_is_not_taken_for_a_forger(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    crashed = AuditAnchorer(bus.js, supervisor_pool, seed, witnessing=True)
    await crashed.__aenter__()
    await _append(supervisor_pool, 2, crashed, witness=crashed)
    await _append(supervisor_pool, 2, witness=crashed)  # appended, then SIGKILL: never anchored
    async with AuditAnchorer(bus.js, supervisor_pool, seed, witnessing=True) as restarted:
        await _append(supervisor_pool, 2, restarted, witness=restarted)
    anchors, _ = await read_anchors(bus.js, [restarted.public_key])
    result = await verify_anchored(owner, anchors)
    assert result.intact and result.count == 6, result
    # But a record forged after the restart is not excused by the old crash.
    async with AuditAnchorer(bus.js, supervisor_pool, seed, witnessing=True) as again:
        async with owner.transaction():
            forged = await append_audit(owner, replace(ENTRY, detail="forged"))
        await again.anchor("interval")
    first, problem = await _verify(bus, owner, again.public_key)
    assert first == forged and problem.startswith("forged"), problem


async def test_sparse_anchors_name_the_first_record_after_the_last_that_matches(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        ids = await _append(supervisor_pool, 3)
        await anchorer.anchor("interval")
        ids += await _append(supervisor_pool, 4)
        await anchorer.anchor("interval")
        await _rewrite(owner, ids[5], detail="rewritten")
        first, problem = await _verify(bus, owner, anchorer.public_key)
    assert first == ids[3]  # somewhere in records 4..7: the first one no anchor confirms
    assert problem.startswith("rewritten"), problem


async def test_an_intact_log_verifies_and_a_forged_anchor_is_refused(
    owner: asyncpg.Connection, supervisor_pool: asyncpg.Pool, bus: Bus, tmp_path: Path
) -> None:
    seed = _seed(tmp_path / "supervisor.nk")
    async with AuditAnchorer(bus.js, supervisor_pool, seed, interval_s=0.05) as anchorer:
        await _append(supervisor_pool, 3)
        runner = asyncio.create_task(anchorer.run())
        last = anchorer.last
        await eventually(lambda: anchorer.last is not last, message="an interval anchor from run()")
        await anchorer.shutdown()
        await runner
    assert anchorer.last is not None and anchorer.last.reason == "shutdown"
    anchors, forged = await read_anchors(bus.js, [anchorer.public_key])
    assert [a.reason for a in anchors] == ["start", "interval", "shutdown"]
    result = await verify_anchored(owner, anchors)
    assert result.intact and result.count == 3 and result.anchored == 3
    # An anchor signed with another key, claiming the log is shorter, is not one.
    other = nkeys.from_seed(bytearray(_seed(tmp_path / "other.nk").read_bytes()))
    fake = replace_anchor(anchors[-1], count=1, public_key=other.public_key.decode())
    await bus.js.publish(ANCHOR_SUBJECT, msgspec.json.encode(fake), stream=ANCHOR_STREAM)
    anchors, forged = await read_anchors(bus.js, [anchorer.public_key])
    assert forged == 1 and len(anchors) == 3


async def test_cli_verify_names_the_first_deleted_record(
    owner: asyncpg.Connection,
    supervisor_pool: asyncpg.Pool,
    bus: Bus,
    nats_server: EmbeddedNats,
    database_url: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    (state / "creds").mkdir(parents=True)
    seed = _seed(state / "creds" / "supervisor.nk")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "CORRAL_STATE_DIR": str(state),
    }
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        ids = await _append(supervisor_pool, 5, anchorer)
    code, out, err = await _corral(env, "audit", "verify")
    assert code == 0, err
    assert "audit log intact: 5 records" in out and "anchored: 5 records" in out
    await owner.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    await owner.execute("DELETE FROM audit_log WHERE id >= $1", ids[2])
    code, out, err = await _corral(env, "audit", "verify")
    assert code == 1
    assert f"audit log broken at record {ids[2]}: truncated" in err


async def test_cli_verify_requiring_anchors_fails_when_none_confirm_the_chain(
    supervisor_pool: asyncpg.Pool, bus: Bus, nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    (state / "creds").mkdir(parents=True)
    seed = _seed(state / "creds" / "supervisor.nk")
    env = {**os.environ, "DATABASE_URL": database_url, "CORRAL_STATE_DIR": str(state)}
    env.pop("NATS_URL", None)
    await _append(supervisor_pool, 2)

    # Without NATS the chain alone is checked: intact, with a note; required, not confirmed.
    code, out, err = await _corral(env, "audit", "verify")
    assert code == 0, err
    assert "anchors not checked" in err
    code, out, err = await _corral(env, "audit", "verify", "--require-anchors")
    assert code == 3, err
    assert "not confirmed: no signed anchor checked the chain" in err

    # Anchored, the same check passes.
    async with AuditAnchorer(bus.js, supervisor_pool, seed) as anchorer:
        await anchorer.anchor("interval")
    env["NATS_URL"] = nats_server.url
    code, out, err = await _corral(env, "audit", "verify", "--require-anchors")
    assert code == 0, err
    assert "anchored: 2 records" in out


def replace_anchor(anchor: AuditAnchor, **changes: object) -> AuditAnchor:
    return msgspec.structs.replace(anchor, **changes)


async def _rewrite(owner: asyncpg.Connection, record_id: int, *, detail: str) -> None:
    """Edit one record with the trigger off, then recompute every later hash."""
    await owner.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    await owner.execute("UPDATE audit_log SET detail = $2 WHERE id = $1", record_id, detail)
    rows = await owner.fetch("SELECT * FROM audit_log WHERE id >= $1 ORDER BY id", record_id)
    prev = await owner.fetchval("SELECT prev_hash FROM audit_log WHERE id = $1", record_id)
    # UNIQUE(prev_hash, hash): move the old hashes aside first.
    await owner.execute(
        "UPDATE audit_log SET prev_hash = md5(id::text) || md5(id::text),"
        " hash = md5(-id || 'x') || md5(id::text) WHERE id > $1",
        record_id,
    )
    for row in rows:
        new = chain_hash(prev, dict(row))
        await owner.execute(
            "UPDATE audit_log SET prev_hash = $2, hash = $3 WHERE id = $1", row["id"], prev, new
        )
        prev = new
    await owner.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


async def _corral(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.supervisor",
        *args,
        "-c",
        str(SAMPLE_CONFIG),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_running_stack_anchors_its_log_and_verify_names_deleted_records(
    database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "support"
    shutil.copytree(SAMPLE_CONFIG.parent, directory)
    config = yaml.safe_load((directory / "corral.yaml").read_text())
    config["audit"] = {"anchor_interval_s": 0.2}
    (directory / "corral.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "state").mkdir()
    async with running_stack(tmp_path / "state", database_url, None, directory / "corral.yaml") as stack:
        client = await stack.connect("client")
        try:
            ended = await send_and_wait(
                client,
                "I was charged twice for order 1001, please refund the duplicate.",
                customer="cus_1001",
            )
        finally:
            await client.close()
        assert ended.status == "replied", ended
        records = await stack.sql("SELECT id FROM audit_log ORDER BY id")
        assert records

        async def _anchored() -> bool:
            done = await asyncio.to_thread(stack.corral, "audit", "verify")
            return done.returncode == 0 and f"anchored: {len(records)} records" in done.stdout

        await eventually(_anchored, message="every record anchored")
        await stack.sql("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        await stack.sql("DELETE FROM audit_log WHERE id = $1", records[-1]["id"])
        done = await asyncio.to_thread(stack.corral, "audit", "verify")
        assert done.returncode == 1
        assert f"audit log broken at record {records[-1]['id']}: truncated" in done.stderr

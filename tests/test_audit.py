"""The audit log against a real PostgreSQL: appends chain, the table refuses changes, and
verification (library and `corral audit verify`) finds exactly the record that was tampered with."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from corral.supervisor.audit._audit import (
    GENESIS_HASH,
    AuditEntry,
    append_audit,
    canonical,
    digest_arguments,
    verify_audit,
)
from corral.supervisor.errors import StoreError
from corral.supervisor.store._store import Store
from tests.conftest import REPO, SAMPLE_CONFIG

ENTRY = AuditEntry(
    agent="payments@1",
    credential_id="UAGENTPAYMENTS",
    on_behalf_of="customer-42",
    conversation="c-1",
    action="tool:refund",
    arguments_digest=digest_arguments({"order": "A-1", "amount": 12.5}),
    decision="allowed",
    policy_ids=("refunds-under-50", "business-hours"),
    outcome="succeeded",
    detail="refund issued — 12,50 €",
)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh, migrated database, as its owner (who may disable triggers)."""
    await (await Store.open(database_url, min_size=1, max_size=1)).close()
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def _append(conn: asyncpg.Connection, n: int, conversation: str = "c-1") -> list[int]:
    ids = []
    for i in range(n):
        async with conn.transaction():
            ids.append(await append_audit(conn, replace(ENTRY, conversation=conversation, outcome=f"ok {i}")))
    return ids


async def _tamper(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    """Change the log the way only the table's owner can: with the guard trigger off."""
    async with conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        await conn.execute(sql, *args)
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


def test_digest_arguments_is_canonical_json() -> None:
    assert digest_arguments({"b": 1, "a": "é"}) == digest_arguments({"a": "é", "b": 1})
    expected = hashlib.sha256('{"a":"é","b":[1,2]}'.encode()).hexdigest()
    assert digest_arguments({"b": [1, 2], "a": "é"}) == expected


def test_canonical_encoding_is_pinned() -> None:
    record = {
        "id": 7,
        "created_at": datetime(2025, 1, 31, 13, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))),
        "agent": "a",
        "credential_id": "k",
        "on_behalf_of": "ü",
        "conversation": "c",
        "action": "x",
        "arguments_digest": "d",
        "decision": "allowed",
        "policy_ids": ("p2", "p1"),
        "approval_id": None,
        "outcome": "o",
        "detail": "",
        "hash": "ignored",
    }
    assert (
        canonical(record)
        == (
            '{"action":"x","agent":"a","approval_id":null,"arguments_digest":"d",'
            '"conversation":"c","created_at":"2025-01-31T12:00:00.000005+00:00","credential_id":"k",'
            '"decision":"allowed","detail":"","id":7,"on_behalf_of":"ü","outcome":"o",'
            '"policy_ids":["p2","p1"]}'
        ).encode()
    )
    with pytest.raises(ValueError, match="timezone"):
        canonical({**record, "created_at": datetime(2025, 1, 31)})


async def test_empty_log_verifies(conn: asyncpg.Connection) -> None:
    result = await verify_audit(conn)
    assert (result.count, result.first_broken, result.problem, result.head) == (0, None, None, None)


async def test_appends_chain_and_verify(conn: asyncpg.Connection, database_url: str) -> None:
    ids = await _append(conn, 5)
    async with conn.transaction():
        with_approval = await append_audit(conn, replace(ENTRY, approval_id="ap-1", policy_ids=()))
    ids.append(with_approval)
    assert ids == sorted(ids) and len(set(ids)) == 6
    rows = await conn.fetch("SELECT id, prev_hash, hash, created_at FROM audit_log ORDER BY id")
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    row = await conn.fetchrow("SELECT * FROM audit_log WHERE id=$1", with_approval)
    assert (row["approval_id"], row["policy_ids"], row["detail"]) == ("ap-1", [], ENTRY.detail)

    result = await verify_audit(conn)
    assert (result.count, result.first_broken, result.problem) == (6, None, None)
    assert result.intact and result.head == rows[-1]["hash"]
    # Through a pool, and inside the caller's own transaction, the answer is the same.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        assert (await verify_audit(pool)).count == 6
    finally:
        await pool.close()
    async with conn.transaction():
        assert (await verify_audit(conn)).count == 6


async def test_the_databases_hash_is_the_one_verify_computes(conn: asyncpg.Connection) -> None:
    """The database hashes what it appends; every character JSON escapes must come out as
    ``canonical`` writes it, or verification would call an untouched record altered."""
    awkward = 'quote " backslash \\ newline \n tab \t nul-ish \x01 line-sep \u2028 emoji \U0001f980 é'
    entry = replace(ENTRY, detail=awkward, agent=awkward, policy_ids=(awkward, ""), approval_id=None)
    async with conn.transaction():
        appended = await append_audit(conn, entry)
    row = await conn.fetchrow("SELECT * FROM audit_log WHERE id=$1", appended)
    assert row["detail"] == awkward and row["policy_ids"] == [awkward, ""]
    expected = hashlib.sha256(bytes.fromhex(GENESIS_HASH) + canonical(dict(row))).hexdigest()
    assert row["hash"] == expected
    assert (await verify_audit(conn)).intact


async def test_a_rolled_back_append_leaves_no_trace(conn: asyncpg.Connection) -> None:
    await _append(conn, 2)
    with pytest.raises(RuntimeError, match="the action failed"):
        async with conn.transaction():
            await append_audit(conn, ENTRY)
            raise RuntimeError("the action failed")
    await _append(conn, 1)  # its id skips the rolled-back one: a gap in ids is not a break
    result = await verify_audit(conn)
    assert (result.count, result.first_broken) == (3, None)


async def test_concurrent_appenders_chain_correctly(conn: asyncpg.Connection, database_url: str) -> None:
    appenders = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        batches = await asyncio.gather(*(_append(c, 8, f"c-{i}") for i, c in enumerate(appenders)))
    finally:
        await asyncio.gather(*(c.close() for c in appenders))
    assert len({i for batch in batches for i in batch}) == 48
    result = await verify_audit(conn)
    assert (result.count, result.first_broken, result.problem) == (48, None, None)
    assert await conn.fetchval("SELECT count(DISTINCT prev_hash) FROM audit_log") == 48


async def test_append_needs_a_read_committed_transaction(conn: asyncpg.Connection) -> None:
    with pytest.raises(StoreError, match="inside a transaction") as outside:
        await append_audit(conn, ENTRY)
    assert outside.value.retryable is False
    with pytest.raises(StoreError, match="READ COMMITTED"):
        async with conn.transaction(isolation="repeatable_read"):
            await append_audit(conn, ENTRY)
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET outcome = 'nothing happened'",
        "DELETE FROM audit_log WHERE id = 1",
        "DELETE FROM audit_log WHERE false",
        "TRUNCATE audit_log",
    ],
)
async def test_the_table_refuses_changes(conn: asyncpg.Connection, statement: str) -> None:
    await _append(conn, 2)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="audit_log is append-only"):
        await conn.execute(statement)
    assert (await verify_audit(conn)).count == 2


async def test_an_altered_row_is_reported(conn: asyncpg.Connection) -> None:
    ids = await _append(conn, 5)
    await _tamper(conn, "UPDATE audit_log SET outcome = 'denied' WHERE id = $1", ids[2])
    result = await verify_audit(conn)
    assert (result.count, result.first_broken) == (2, ids[2])
    assert result.problem == "hash mismatch: row was altered"


async def test_an_altered_row_with_a_recomputed_hash_breaks_the_next_link(conn: asyncpg.Connection) -> None:
    ids = await _append(conn, 4)
    await _tamper(
        conn, "UPDATE audit_log SET outcome = 'denied', hash = repeat('a', 64) WHERE id = $1", ids[1]
    )
    # The forged row carries a valid-looking but wrong hash, so it fails itself first...
    result = await verify_audit(conn)
    assert result.first_broken == ids[1]
    # ...and a forger who makes a row self-consistent still breaks the link after it.
    row = dict(await conn.fetchrow("SELECT * FROM audit_log WHERE id = $1", ids[1]))
    forged = hashlib.sha256(bytes.fromhex(row["prev_hash"]) + canonical(row)).hexdigest()
    await _tamper(conn, "UPDATE audit_log SET hash = $2 WHERE id = $1", ids[1], forged)
    result = await verify_audit(conn)
    assert (result.count, result.first_broken) == (2, ids[2])
    assert result.problem is not None and result.problem.startswith(
        f"prev_hash does not match record {ids[1]}"
    )


async def test_a_deleted_middle_row_breaks_the_next_link(conn: asyncpg.Connection) -> None:
    ids = await _append(conn, 5)
    await _tamper(conn, "DELETE FROM audit_log WHERE id = $1", ids[2])
    result = await verify_audit(conn)
    assert (result.count, result.first_broken) == (2, ids[3])
    assert result.problem is not None and result.problem.startswith(
        f"prev_hash does not match record {ids[1]}"
    )


async def test_a_deleted_first_row_is_reported(conn: asyncpg.Connection) -> None:
    ids = await _append(conn, 3)
    await _tamper(conn, "DELETE FROM audit_log WHERE id = $1", ids[0])
    result = await verify_audit(conn)
    assert (result.count, result.first_broken) == (0, ids[1])
    assert result.problem is not None and "genesis" in result.problem


async def _corral(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.supervisor",
        *args,
        "-c",
        str(SAMPLE_CONFIG),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_verify_on_a_fresh_database(database_url: str) -> None:
    code, out, err = await _corral(database_url, "audit", "verify")
    assert code == 0, out + err
    assert "audit log intact: 0 records" in out


async def test_cli_verify_reports_the_broken_record(conn: asyncpg.Connection, database_url: str) -> None:
    ids = await _append(conn, 4)
    code, out, err = await _corral(database_url, "audit", "verify")
    assert code == 0, out + err
    assert "audit log intact: 4 records" in out
    head = await conn.fetchval("SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1")
    assert f"head: {head}" in out

    await _tamper(conn, "UPDATE audit_log SET detail = 'nothing to see' WHERE id = $1", ids[1])
    code, out, err = await _corral(database_url, "audit", "verify")
    assert code == 1, out + err
    assert f"audit log broken at record {ids[1]}: hash mismatch: row was altered" in err

"""Decisions are saved optimistically: a save applies only to the version it was decided on;
saves that arrive together commit together."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from corral.supervisor.errors import ConcurrentChange
from corral.supervisor.store._store import ConversationRecord, ConversationSnapshot, StepRecord, Store


async def test_a_decision_on_a_stale_snapshot_is_refused_and_a_fresh_one_applies(database_url: str) -> None:
    store = await Store.open(database_url)
    other = await Store.open(database_url)  # another process deciding on the same conversation
    try:
        new = ConversationRecord(id="c-occ", text="t", current_agent="triage", step=1)
        async with store.snapshot("c-occ", expect_new=True) as snapshot:
            await snapshot.save(new, [StepRecord(step=1, agent="triage", kind="started")])
        async with other.snapshot("c-occ") as theirs:
            assert theirs.record is not None and theirs.record.version == 0
            await theirs.save(theirs.record.evolve(step=2, current_agent="payments"), [])
        # This store's copy (version 0) is stale now: its save changes nothing.
        async with store.snapshot("c-occ") as mine:
            assert mine.record is not None and mine.record.step == 1
            with pytest.raises(ConcurrentChange):
                await mine.save(mine.record.evolve(status="escalated"), [])
        async with store.snapshot("c-occ", fresh=True) as mine:
            assert mine.record is not None and (mine.record.step, mine.record.version) == (2, 1)
            await mine.save(mine.record.evolve(status="replied", reply="done"), [])
        saved = await store.get("c-occ")
        assert saved is not None and (saved.status, saved.step, saved.version) == ("replied", 2, 2)
        # A start that already exists conflicts instead of overwriting.
        async with other.snapshot("c-occ", expect_new=True) as again:
            with pytest.raises(ConcurrentChange):
                await again.save(new, [])
        assert [s.kind for s in await store.steps("c-occ")] == ["started"]
    finally:
        await store.close()
        await other.close()


async def test_saves_that_arrive_together_commit_together(database_url: str) -> None:
    """While one save is in PostgreSQL the others gather and commit as one batch; each
    still answers for itself, a conflict included."""
    store = await Store.open(database_url)
    try:
        records = [
            ConversationRecord(id=f"c-{n}", text="t", current_agent="triage", step=1) for n in range(40)
        ]

        async def start(record: ConversationRecord) -> None:
            async with store.snapshot(record.id, expect_new=True) as snapshot:
                await snapshot.save(record, [StepRecord(step=1, agent="triage", kind="started")])

        await asyncio.gather(*(start(record) for record in records))
        assert store.batches < len(records) / 4
        assert await store.counts() == {"running": 40}
        assert [s.kind for s in await store.steps("c-7")] == ["started"]

        # Two decisions on the same version in one batch: one applies, the other conflicts;
        # the rest of the batch commits all the same.
        snapshots = [store.snapshot(r.id) for r in records[:10]] + [store.snapshot("c-0")]
        results = await asyncio.gather(
            *(_escalate(snapshot) for snapshot in snapshots), return_exceptions=True
        )
        assert sum(isinstance(result, ConcurrentChange) for result in results) == 1
        assert await store.counts() == {"escalated": 10, "running": 30}
    finally:
        await store.close()


async def test_a_statement_postgresql_refuses_fails_only_its_own_save(database_url: str) -> None:
    store = await Store.open(database_url)
    try:
        good = [ConversationRecord(id=f"c-{n}", text="t", current_agent="triage", step=1) for n in range(5)]
        bad = ConversationRecord(
            id="c-bad", text="t", current_agent="triage", step=1, status="no such status"
        )  # type: ignore[arg-type]

        async def start(record: ConversationRecord) -> None:
            async with store.snapshot(record.id, expect_new=True) as snapshot:
                await snapshot.save(record, [])

        results = await asyncio.gather(*(start(r) for r in [*good, bad]), return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 5 + ["StoreError"]
        assert "refused" in str(results[-1])
        assert await store.counts() == {"running": 5}
    finally:
        await store.close()


async def _escalate(snapshot: contextlib.AbstractAsyncContextManager[ConversationSnapshot]) -> None:
    async with snapshot as mine:
        assert mine.record is not None
        await mine.save(mine.record.evolve(status="escalated"), [])

"""Decisions are saved optimistically: a save applies only to the version it was decided on."""

from __future__ import annotations

import pytest

from supervisor._store import ConversationRecord, StepRecord, Store
from supervisor.errors import ConcurrentChange


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

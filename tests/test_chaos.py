"""Chaos in the suite: 60 conversations (a third of them in two customer turns) while
agents and the supervisor are SIGKILLed, nats-server is killed and restarted, and
PostgreSQL crashes and restarts. Every conversation must end, the refunds must be exactly
the expected ones, none lost.

The experiment runs its own nats-server and PostgreSQL (it has to restart both), so it
ignores DATABASE_URL."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import REPO


def _chaos_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_sixty_conversations_survive_kills_and_restarts(tmp_path: Path) -> None:
    chaos = _chaos_module()
    report = await chaos.run_chaos(
        60,
        tmp_path,
        concurrency=12,
        seed=7,
        kill_every_s=(1.0, 2.0),
        max_kills=8,
        deadline_s=240.0,
        log=lambda *_: None,
    )
    faults = " | ".join(report.faults)
    assert "nats-server: SIGKILL and restart" in faults
    assert "PostgreSQL: immediate shutdown and restart" in faults
    assert "SIGKILL supervisor" in faults
    assert any(f.startswith("SIGKILL") and "supervisor" not in f for f in report.faults), faults
    assert report.lost == 0, report
    assert report.completed + report.escalated == 60, report
    assert report.duplicate_side_effects == 0, report
    assert report.missing_side_effects == 0, report
    # Every replied refund conversation has its refund, once; an escalated one may have
    # applied its refund before it stopped, but nothing else is in the shop.
    assert report.refunds_expected <= report.refunds_applied <= report.refunds_expected + report.escalated
    assert report.refunds_expected > 0
    # Multi-turn conversations came through it too: their second turn after the faults began.
    assert report.multi_turn > 0, report

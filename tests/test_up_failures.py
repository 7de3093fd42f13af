"""`corral up` stops, non-zero and with the reason on the terminal, when the team cannot run:
a bad policy is refused before anything starts (exit 2); a process that keeps failing at
start stops the stack with the end of its log (exit 1), instead of restarting forever."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_CONFIG

FAILS_IN_THE_SUPERVISOR = """
import os as _os
import sys as _sys

# Only the services `corral up` starts set this, and only the supervisor runs as
# `supervisor run`: `corral up` itself (and its check) and the model gateway (which reads
# the tools' schemas) import these tools fine, the supervisor process cannot.
if _os.environ.get("CORRAL_DATABASE_PREPARED") == "1" and _sys.argv[1:2] == ["supervisor"]:
    {failure}
"""


@pytest.fixture
def team(tmp_path: Path) -> Path:
    """A copy of the sample team; returns its corral.yaml."""
    shutil.copytree(SAMPLE_CONFIG.parent, tmp_path / "team")
    return tmp_path / "team" / "corral.yaml"


def _up(config: Path, state: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS"}}
    env["CORRAL_STATE_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "up", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stopped(state: Path) -> None:
    """Everything the stack started is gone."""
    assert not (state / "runtime.json").exists()
    assert not (state / "postgres" / "postmaster.pid").exists()


async def test_a_cedar_syntax_error_stops_up_before_anything_starts(team: Path, tmp_path: Path) -> None:
    policy = team.parent / "policies" / "refunds.cedar"
    policy.write_text(
        policy.read_text().replace("context.amount_cents <= 0 }", "context.amount_cents <= }", 1)
    )
    state = tmp_path / "state"
    result = await asyncio.to_thread(_up, team, state, 60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"invalid: {policy}:" in result.stderr
    assert "corral is up" not in result.stdout
    assert not state.exists()  # nothing was started, not even the state directory


async def test_a_supervisor_that_keeps_failing_at_start_stops_the_stack_with_its_error(
    team: Path, tmp_path: Path
) -> None:
    tools = team.parent / "tools.py"
    tools.write_text(
        tools.read_text() + FAILS_IN_THE_SUPERVISOR.format(failure="raise RuntimeError('no shop today')")
    )
    state = tmp_path / "state"
    state.mkdir()
    result = await asyncio.to_thread(_up, team, state)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "supervisor failed at start (3 times in a row" in out
    assert "RuntimeError: no shop today" in out  # the end of its log, with the exception line
    assert "restart 2 in" in out and "restart 3 in" not in out
    assert "corral is up" not in out
    _stopped(state)


async def test_a_process_that_exits_with_a_config_error_stops_the_stack_at_once(
    team: Path, tmp_path: Path
) -> None:
    """A config error (exit 2: e.g. a model tier's API key unset) fails the same way each
    time: the first one stops the stack."""
    tools = team.parent / "tools.py"
    failure = "print('config error: the shop is misconfigured', flush=True); raise SystemExit(2)"
    tools.write_text(tools.read_text() + FAILS_IN_THE_SUPERVISOR.format(failure=failure))
    state = tmp_path / "state"
    state.mkdir()
    result = await asyncio.to_thread(_up, team, state)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "supervisor failed at start (once; it exited with code 2" in out
    assert "config error: the shop is misconfigured" in out
    assert "restart 1 in" not in out
    _stopped(state)

"""`corral status` after a `corral up` whose launcher and watchdog were both SIGKILLed: it
does not report "not running" and nothing more while orphans run; it names them, says how
to stop them, and exits 3 (no stack runs); after `corral down`, nothing is left to name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import SAMPLE_CONFIG
from tests.test_up_kill import _env, _up


async def _status(state: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "corral.supervisor", "status", "--json", "-c", str(SAMPLE_CONFIG)],
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_status_names_what_a_killed_launcher_left_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with _up(state) as (process, pids):
        up = json.loads((await _status(state)).stdout)
        assert {p["name"]: p["state"] for p in up["processes"]} == dict.fromkeys(
            ["supervisor", "triage", "payments", "tech_support", "account_manager"], "running"
        )
        os.kill(pids["watchdog"], signal.SIGKILL)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done = await _status(state)
        assert done.returncode == 3, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["running"] is False
        left = {p["name"]: p["pid"] for p in report["leftovers"]}
        assert left["nats-server"] == pids["nats-server"] and left["PostgreSQL"] == pids["postgres"]
        assert left["triage"] == pids["triage"]
        text = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "corral.supervisor", "status", "-c", str(SAMPLE_CONFIG)],
            env=_env(state),
            capture_output=True,
            text=True,
            timeout=120,
        )
        said = " ".join(text.stdout.split())
        assert "its launcher is gone, but what it started still runs:" in said
        assert f"nats-server (pid {pids['nats-server']})" in said and "`corral down` stops it" in said
        down = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "corral.supervisor", "down", "-c", str(SAMPLE_CONFIG)],
            env=_env(state),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        after = await _status(state)
        assert after.returncode == 3 and json.loads(after.stdout)["leftovers"] == []

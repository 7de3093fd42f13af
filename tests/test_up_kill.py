"""A `corral up` whose launcher is SIGKILLed leaves nothing running: its watchdog stops the
children, nats-server and PostgreSQL; and when the watchdog is killed too, `corral status`
names what is left (exit 3) and `corral down` finds it and stops it (neither says only
"not running" while orphans run)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import SAMPLE_CONFIG, eventually


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _pids(runtime: dict[str, Any]) -> dict[str, int]:
    """Every pid runtime.json names: the launcher, its watchdog, the servers, the children."""
    pids = {
        "launcher": runtime["pid"],
        "watchdog": runtime["watchdog_pid"],
        "nats-server": runtime["nats_pid"],
        "postgres": runtime["postgres_pid"],
    }
    pids.update({c["name"]: c["pid"] for c in runtime["children"]})
    assert all(isinstance(pid, int) for pid in pids.values()), pids
    return pids


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS"}}
    env["CORRAL_STATE_DIR"] = str(state)
    return env


@asynccontextmanager
async def _up(state: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """`corral up` on the sample team, once it is up; killed (with all it names) on the way out."""
    state.mkdir()
    log = state / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral.supervisor", "up", "-c", str(SAMPLE_CONFIG)],
            env=_env(state),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pids: dict[str, int] = {}
    try:

        def _is_up() -> bool:
            assert process.poll() is None, log.read_text()
            return "corral is up" in log.read_text()

        await eventually(_is_up, timeout=150, message="corral is up")
        pids = _pids(json.loads((state / "runtime.json").read_text()))
        yield process, pids
    finally:
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_nothing_outlives_a_sigkilled_launcher(tmp_path: Path) -> None:
    async with _up(tmp_path / "state") as (process, pids):
        assert all(_running(pid) for pid in pids.values())
        process.send_signal(signal.SIGKILL)
        process.wait()
        await eventually(
            lambda: not [name for name, pid in pids.items() if _running(pid)],
            timeout=45,
            message="every process of runtime.json gone",
        )
        state = tmp_path / "state"
        assert not (state / "runtime.json").exists()  # the watchdog removed it
        assert not (state / "postgres" / "postmaster.pid").exists()  # a clean shutdown
        assert "the launcher is gone" in (state / "logs" / "watchdog.log").read_text()


async def _corral(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "corral.supervisor", *args, "-c", str(SAMPLE_CONFIG)],
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_status_names_and_down_stops_what_a_killed_launcher_and_watchdog_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with _up(state) as (process, pids):
        up = json.loads((await _corral(state, "status", "--json")).stdout)
        assert {p["name"]: p["state"] for p in up["processes"]} == dict.fromkeys(
            ["supervisor", "router", "api", "triage", "payments", "tech_support", "account_manager"],
            "running",
        )
        os.kill(pids["watchdog"], signal.SIGKILL)
        process.send_signal(signal.SIGKILL)
        process.wait()
        servers = {name: pids[name] for name in ("nats-server", "postgres")}
        assert all(_running(pid) for pid in servers.values())  # orphans nobody stops
        # `corral status` does not say "not running" and nothing more: it names them.
        status = await _corral(state, "status", "--json")
        assert status.returncode == 3, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["running"] is False
        left = {p["name"]: p["pid"] for p in report["leftovers"]}
        assert left["nats-server"] == pids["nats-server"] and left["PostgreSQL"] == pids["postgres"]
        # The children stop on their own within about a second of their launcher's death
        # (they watch it): any still listed is named with its own pid.
        assert all(left[name] == pids[name] for name in left.keys() - {"nats-server", "PostgreSQL"})
        said = " ".join((await _corral(state, "status")).stdout.split())
        assert "its launcher is gone, but what it started still runs:" in said
        assert f"nats-server (pid {pids['nats-server']})" in said and "`corral down` stops it" in said
        down = await _corral(state, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "not running" not in down.stdout
        assert "corral's launcher is gone; stopping what it left running:" in down.stdout
        assert f"nats-server (pid {servers['nats-server']})" in down.stdout
        assert f"PostgreSQL (pid {servers['postgres']})" in down.stdout
        assert "corral stopped" in down.stdout
        await eventually(
            lambda: not [name for name, pid in pids.items() if _running(pid)],
            timeout=45,
            message="every process of runtime.json gone",
        )
        assert not (state / "runtime.json").exists()
        after = await _corral(state, "status", "--json")
        assert after.returncode == 3 and json.loads(after.stdout)["leftovers"] == []
        again = await _corral(state, "down")
        assert (again.returncode, again.stdout.strip()) == (0, "corral is not running here")

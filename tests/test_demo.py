"""The README's first command: `corral demo --once` on the embedded defaults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import eventually


def test_demo_once_runs_the_samples_on_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    env["COLUMNS"] = "200"
    # From an empty directory: no ./corral.yaml, so the sample team is used.
    result = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "demo", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "path:   triage -> payments (0.93) -> account_manager (0.91)" in out
    assert "path:   triage -> tech_support (0.88)" in out
    assert "path:   triage -> account_manager (0.90)" in out
    assert "waiting for approval a-" in out and "approving it as the demo operator" in out
    assert "payments refund -> ok [P-45]" in out
    assert "6/6 conversations ended as expected" in out
    # Everything it started is stopped: no runtime file, PostgreSQL shut down; all of it
    # in the demo's own state, apart from the team's.
    state = tmp_path / ".corral" / "demo"
    assert sorted(p.name for p in (tmp_path / ".corral").iterdir()) == ["demo"]
    assert not (state / "runtime.json").exists()
    assert not (state / "postgres" / "postmaster.pid").exists()
    assert (state / "nats" / "jetstream").is_dir()


async def test_demo_keeps_running_until_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral.supervisor", "demo"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def _waiting_for_ctrl_c() -> bool:
            assert process.poll() is None, log.read_text()
            return "Ctrl-C stops everything." in log.read_text()

        await eventually(_waiting_for_ctrl_c, timeout=180, message="the demo waiting for Ctrl-C")
        runtime = json.loads((tmp_path / ".corral" / "demo" / "runtime.json").read_text())
        children = [c["pid"] for c in runtime["children"]]
        assert all(_alive(pid) for pid in children)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert not any(_alive(pid) for pid in children)
    assert not (tmp_path / ".corral" / "demo" / "runtime.json").exists()
    assert not (tmp_path / ".corral" / "demo" / "postgres" / "postmaster.pid").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_checks_each_outcome_exactly(tmp_path: Path) -> None:
    # Two samples that end well but not as they claim: one waits for an approval it is not
    # marked for, one makes a tool call its expectation does not list.
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(
        "conversations:\n"
        "  - name: unmarked approval\n"
        "    customer: cus_1001\n"
        '    text: "Please refund order 1002, it arrived broken."\n'
        "    expect: {status: replied, path: [triage, payments, account_manager]}\n"
        "  - name: unlisted tool call\n"
        "    customer: cus_1001\n"
        '    text: "I was charged twice for order 1001, please refund the duplicate."\n'
        "    expect: {status: replied, path: [triage, payments, account_manager], reply_contains: refund}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    env["COLUMNS"] = "200"
    result = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "demo", "--once", "--scenarios", str(scenarios)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "(the sample is not marked `approve: true`)" in out
    assert "approving it" not in out
    assert "unexpected: tool decisions ['payments refund -> ok'], expected []" in out
    assert "0/2 conversations ended as expected" in out

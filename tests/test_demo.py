"""The README's first command: `corral demo --once` on the embedded defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_once_runs_the_samples_on_embedded_servers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    env["COLUMNS"] = "200"
    # From an empty directory: no ./corral.yaml, so the sample team is used.
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--once"],
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
    assert "5/5 conversations ended as expected" in out
    # Everything it started is stopped: no runtime file, PostgreSQL shut down.
    state = tmp_path / ".corral"
    assert not (state / "runtime.json").exists()
    assert not (state / "postgres" / "postmaster.pid").exists()
    assert (state / "nats" / "jetstream").is_dir()

"""`corral init DIR` writes a team that runs as it is: `corral demo --once` on it starts the
team, sends its sample conversations and gets a reply that used its one tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_starter_team_runs_as_written_and_replies_with_its_tool(
    tmp_path: Path, database_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS"}}
    env.update(CORRAL_STATE_DIR=str(tmp_path / "state"), DATABASE_URL=database_url)
    team = tmp_path / "team"
    init = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "init", str(team)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    demo = subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "demo", "--once", "-c", str(team / "corral.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = " ".join(demo.stdout.split())
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "tool: orders order_status -> ok [S-1]" in out
    assert "path: triage -> orders (0.90)" in out
    assert "reply: Order 1001 is shipped." in out
    assert "2/2 conversations ended as expected" in out

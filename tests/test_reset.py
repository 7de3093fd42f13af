"""`corral reset`: deletes this directory's corral state after asking, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from corral.supervisor.stack._runtime import Runtime


def _reset(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    return subprocess.run(
        [sys.executable, "-m", "corral.supervisor", "reset", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


def _state(tmp_path: Path) -> Path:
    state = tmp_path / ".corral"
    for name in ("creds", "logs", "postgres", "nats", "demo"):
        (state / name).mkdir(parents=True)
    (state / "postgres" / "PG_VERSION").write_text("16\n")
    return state


def test_reset_asks_and_without_an_answer_deletes_nothing(tmp_path: Path) -> None:
    state = _state(tmp_path)
    result = _reset(tmp_path, stdin="")  # not a terminal: nobody to ask
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pass --yes to confirm" in _flat(result.stderr)
    assert (state / "postgres" / "PG_VERSION").exists()


def test_reset_yes_deletes_the_state(tmp_path: Path) -> None:
    state = _state(tmp_path)
    result = _reset(tmp_path, "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deleted" in result.stdout
    assert not state.exists()
    again = _reset(tmp_path, "--yes")
    assert again.returncode == 0 and "nothing to reset" in again.stdout


def test_reset_refuses_while_a_stack_runs(tmp_path: Path) -> None:
    state = _state(tmp_path)
    for where in (state, state / "demo"):
        Runtime(
            pid=os.getpid(), nats_url="nats://127.0.0.1:1", embedded_nats=True, embedded_postgres=True
        ).write(where)
        result = _reset(tmp_path, "--yes")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"corral is running from {where} (pid {os.getpid()})" in _flat(result.stderr)
        assert (state / "postgres" / "PG_VERSION").exists()
        (where / "runtime.json").unlink()


def test_reset_deletes_nothing_corral_did_not_write(tmp_path: Path) -> None:
    state = _state(tmp_path)
    (state / "notes.txt").write_text("mine")
    result = _reset(tmp_path, "--yes")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "notes.txt" in result.stderr and "nothing deleted" in _flat(result.stderr)
    assert (state / "notes.txt").exists() and (state / "postgres").exists()

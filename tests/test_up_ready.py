"""`corral up` says "corral is up" only once every process serves, shows each as it comes to
serve, keeps PostgreSQL's start-up detail out of the terminal (its own log keeps it), and a
normal `corral down` logs no lost connection anywhere."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import eventually
from tests.stack import PROCESSES, TEAM, running_stack

AGENTS = sorted(TEAM - {"supervisor"})


async def test_corral_up_is_up_once_every_process_serves_and_says_so_quietly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    async with running_stack(state, None, None) as stack:
        # Read the moment the line appears: every process must serve by then.
        await eventually(
            lambda: "corral is up" in stack.log.read_text(),
            timeout=150,
            interval=0.01,
            message="corral is up",
        )
        runtime = stack.runtime()
        assert runtime is not None
        assert {c["name"]: c["ready"] for c in runtime["children"]} == dict.fromkeys(PROCESSES, True)
        logs = state / "logs"
        for agent in AGENTS:
            assert f"agent {agent} serving" in (logs / f"{agent}.log").read_text(), agent
        assert "supervisor serving" in (logs / "supervisor.log").read_text()
        assert "model gateway serving corral.from.*.model" in (logs / "router.log").read_text()
        assert f"API serving on {runtime['api_url']}" in (logs / "api.log").read_text()
        out = stack.log.read_text()
        starting, _, after = out.partition("corral is up")
        assert f"waiting for {', '.join(c['name'] for c in runtime['children'])}…" in starting
        for name in PROCESSES:
            assert f"  {name} serves (" in starting, name
        assert f"; API {runtime['api_url']}; 7 processes serve" in after
        assert runtime["api_url"].startswith("http://127.0.0.1:")
        # Quiet: none of pgserver's, initdb's or pg_ctl's lines, nor the migrations; the
        # launcher's own log has them.
        for noise in ("pgserver", "initdb", "pg_ctl", "applied migration"):
            assert noise not in out, noise
        launcher = (logs / "launcher.log").read_text()
        assert "initdb" in launcher and "applied migration" in launcher
    # running_stack ran `corral down`: nothing logged a lost connection on the way out.
    for log in [stack.log, *sorted((state / "logs").glob("*.log"))]:
        assert "lost; reconnecting" not in log.read_text(), log.name

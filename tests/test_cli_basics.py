"""The CLI without a running team: what a new user types first. `--version`, shell
completion, what `--help` loads, `corral status` with nothing running, unknown agents,
a message too large for a command line, and `corral init`'s refusal to overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("litellm", "asyncpg", "cedarpy", "nats", "pydantic", "yaml")


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS", "CORRAL_STATE_DIR"}
    }
    return {**env, "CORRAL_STATE_DIR": str(state), **extra}


def corral(state: Path, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``corral ARGS`` in a process of its own, its stdout a pipe (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "corral.supervisor", *args],
        env=_env(state, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config of a starter team (`corral init`), apart from the sample's."""
    root = tmp_path_factory.mktemp("team")
    done = corral(root, "init", str(root / "team"))
    assert done.returncode == 0, done.stderr
    return root / "team" / "corral.yaml"


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    done = corral(tmp_path, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"corral {version('corral')}"


def test_shell_completion_is_offered(tmp_path: Path) -> None:
    done = corral(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "--install-completion" in done.stdout and "--show-completion" in done.stdout
    for command in ("show", "conversations", "init", "send", "status", "approve"):
        assert command in done.stdout


def test_help_loads_no_nats_database_cedar_or_litellm(tmp_path: Path) -> None:
    """Every command registered, nothing heavy imported: `--help` pays for typer alone."""
    probe = (
        "import json, sys\n"
        "sys.argv = ['corral', '--help']\n"
        "from corral.supervisor.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit:\n    pass\n"
        f"sys.stderr.write(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert "Commands" in done.stdout
    assert json.loads(done.stderr.splitlines()[-1]) == []


def test_a_command_loads_what_it_uses_when_it_runs(tmp_path: Path, team: Path) -> None:
    """`corral status` with no stack reads the config (pydantic, yaml) but never touches
    PostgreSQL's driver or Cedar, and no command module imports litellm."""
    probe = (
        "import json, sys\n"
        "sys.argv = ['corral', 'status', '-c', sys.argv[1]]\n"
        "from corral.supervisor.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "sys.stderr.write(json.dumps([code, [m for m in ('litellm', 'cedarpy') if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(team)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(done.stderr.splitlines()[-1]) == [3, []], done.stderr


def test_a_client_command_loads_nats_without_aiohttp_and_its_tools_not_at_all(tmp_path: Path) -> None:
    """`corral send` (its stack is not running: it fails to connect, exit 1) loads nats-py
    without aiohttp, which nats-py wants only for WebSocket URLs, and does not import the
    team's tools module (asyncpg with it); aiohttp still imports normally afterwards."""
    probe = (
        "import json, sys\n"
        "sys.argv = ['corral', 'send', 'hello', '--timeout', '1']\n"
        "from corral.supervisor.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "import nats.aio.transport as transport\n"
        "loaded = [m for m in ('nats', 'aiohttp', 'asyncpg') if m in sys.modules]\n"
        "import aiohttp\n"
        "usable = hasattr(aiohttp, 'ClientSession')\n"
        "skipped = transport.aiohttp is None\n"
        "from corral.supervisor.cli._shared import _websockets_back\n"
        "_websockets_back()  # what connecting to a ws:// server does first\n"
        "usable = usable and transport.aiohttp is aiohttp\n"
        "sys.stderr.write(json.dumps([code, loaded, skipped, usable]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    code, loaded, skipped, usable = json.loads(done.stderr.splitlines()[-1])
    assert code != 0 and loaded == ["nats"] and skipped and usable, done.stderr


def test_status_without_a_stack_exits_3_and_shows_addresses_without_password(
    tmp_path: Path, team: Path
) -> None:
    dsn = "postgresql://corral:s3cret-pw@127.0.0.1:9/corral"
    done = corral(tmp_path, "status", "-c", str(team), DATABASE_URL=dsn)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "corral up is not running from this directory" in done.stdout
    assert "postgresql://corral:***@127.0.0.1:9/corral" in done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr
    as_json = corral(tmp_path, "status", "--json", "-c", str(team), DATABASE_URL=dsn)
    assert as_json.returncode == 3
    report = json.loads(as_json.stdout)
    assert report["running"] is False and report["processes"] == []
    assert report["database_url"] == "postgresql://corral:***@127.0.0.1:9/corral"
    assert report["nats_url"] is None


@pytest.mark.parametrize("command", [["revive", "agent", "nosuch"], ["kill", "agent", "nosuch"]])
def test_an_unknown_agent_exits_2_naming_the_configured_ones(
    tmp_path: Path, team: Path, command: list[str]
) -> None:
    done = corral(tmp_path, *command, "-c", str(team))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown agent 'nosuch'" in done.stderr and "triage, orders" in done.stderr


def test_a_message_over_the_limit_from_stdin_is_refused_by_corral(tmp_path: Path, team: Path) -> None:
    """1.1 MB: too long for a command line (the kernel refuses it), so `-` reads stdin; over
    limits.customer_text_bytes it gets corral's refusal, before anything is sent."""
    message = "refund " * 160_000
    done = corral(tmp_path, "send", "-", "--wait", "-c", str(team), stdin=message)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    said = " ".join(done.stderr.split())
    assert f"refused: text of {len(message)} bytes exceeds limits.customer_text_bytes (16384)" in said
    assert "nothing was sent" in said
    as_json = corral(tmp_path, "send", "-", "--json", "-c", str(team), stdin=message)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["status"] == "refused"


def test_conversations_refuses_an_unknown_status(tmp_path: Path, team: Path) -> None:
    done = corral(tmp_path, "conversations", "--status", "done", "-c", str(team))
    assert done.returncode == 2
    assert (
        "--status 'done': expected one of queued, running, waiting, awaiting_customer, replied" in done.stderr
    )


def test_init_writes_the_starter_team_and_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    team = tmp_path / "team"
    done = corral(tmp_path, "init", str(team))
    assert done.returncode == 0, done.stderr
    written = sorted(str(p.relative_to(team)) for p in team.rglob("*") if p.is_file())
    assert written == [
        "corral.yaml",
        "instructions/orders.md",
        "instructions/triage.md",
        "policies/orders.cedar",
        "scenarios.yaml",
        "scripted.yaml",
        "tools.py",
    ]
    assert f"corral demo --once -c {team / 'corral.yaml'}" in done.stdout
    before = (team / "corral.yaml").read_text()
    (team / "corral.yaml").write_text(before + "# mine\n")
    again = corral(tmp_path, "init", str(team))
    assert again.returncode == 2
    assert f"{team} is not empty: nothing written" in " ".join(again.stderr.split())
    assert (team / "corral.yaml").read_text() == before + "# mine\n"
    # An empty directory is fine: `mkdir team && corral init team`.
    (tmp_path / "empty").mkdir()
    assert corral(tmp_path, "init", str(tmp_path / "empty")).returncode == 0
    # The team it writes is a valid config, as it is.
    from corral.supervisor.config._config import load_config

    loaded = load_config(team / "corral.yaml")
    assert loaded.agent_names == ["triage", "orders"]

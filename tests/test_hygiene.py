"""Embedded mode hygiene, on a default `corral up` (embedded NATS and PostgreSQL, no
monitoring asked for): nothing serves the monitoring endpoint, runtime.json is private and
holds no DSN, agents run as users of their own that can read no seed but their own, and the
supervisor connects as the restricted database role."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import eventually
from tests.stack import TEAM, Stack, running_stack

AGENTS = sorted(TEAM - {"supervisor"})


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("state"), None, None, monitor=False) as stack:
        yield stack


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def test_a_default_corral_up_serves_no_monitoring_port(stack: Stack) -> None:
    runtime = stack.runtime()
    assert runtime is not None and runtime["nats_monitor_url"] is None
    conf = (stack.state_dir / "nats" / "nats-server.conf").read_text()
    assert "http" not in conf
    pid = int((stack.state_dir / "nats" / "nats-server.pid").read_text())
    listening = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"}
    port = int(stack.nats_url.rsplit(":", 1)[1])
    assert listening == {port}  # the client port only


async def test_runtime_json_is_private_and_holds_no_database_dsn(stack: Stack) -> None:
    path = stack.state_dir / "runtime.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for private in ("nats", "logs", "creds"):  # the JetStream store, the logs, the seeds
        assert oct((stack.state_dir / private).stat().st_mode & 0o777) == "0o700", private
    text = path.read_text()
    assert "postgresql:" not in text and "database_url" not in text and "host=" not in text
    # The operator commands still reach the embedded database, through its data directory.
    done = await asyncio.to_thread(stack.corral, "approvals", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run children as other users")
async def test_agents_run_as_users_of_their_own_that_read_no_other_seed(stack: Stack) -> None:
    creds = stack.state_dir / "creds"
    uids = {}
    for name in AGENTS:
        pid = stack.child(name)["pid"]
        uid = int(_status(pid)["Uid"].split()[0])
        assert uid != 0, name
        uids[name] = uid
        env = _environ(pid)
        assert env["CORRAL_CREDS"].startswith("/proc/self/fd/"), env["CORRAL_CREDS"]
        assert "DATABASE_URL" not in env and "CORRAL_SUPERVISOR_DATABASE_URL" not in env
    assert len(set(uids.values())) == len(AGENTS)  # one user per identity
    # As payments' user: no seed on disk, and not the seed triage holds.
    triage = stack.child("triage")["pid"]
    triage_fd = _environ(triage)["CORRAL_CREDS"].rsplit("/", 1)[1]
    targets = [
        str(creds / "admin.nk"),
        str(creds / "agent-triage.nk"),
        str(creds / "agent-payments.nk"),
        f"/proc/{triage}/fd/{triage_fd}",
    ]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        open(path, 'rb').read()\n"
            "        print('READ', path)\n"
            "    except OSError as exc:\n"
            "        print('DENIED', path, type(exc).__name__)\n",
            *targets,
        ],
        user=uids["payments"],
        group=pwd.getpwuid(uids["payments"]).pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=30,
    )
    assert probe.returncode == 0, probe.stderr
    assert "READ" not in probe.stdout, probe.stdout
    assert probe.stdout.count("DENIED") == len(targets)
    # The agents work: a conversation passes through triage to payments and back.
    client = await stack.connect("client")
    try:
        from corral.supervisor import send_and_wait

        ended = await send_and_wait(client, "I was charged twice for order A-1001", timeout_s=60)
    finally:
        await client.close()
    assert ended.status in ("replied", "escalated"), ended


async def test_the_supervisor_connects_as_the_restricted_role(stack: Stack) -> None:
    rows = await eventually(
        lambda: stack.sql("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = ''"),
        message="the supervisor's sessions",
    )
    assert "corral_supervisor" in {r["usename"] for r in rows}
    assert "the supervisor connects as corral_supervisor" in stack.log.read_text()

"""`corral up` as a test runs it: a separate process tree, found through runtime.json."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from corral.bus import Bus, BusConfig, connect
from corral.supervisor.stack._runtime import embedded_database_url
from tests.conftest import SAMPLE_CONFIG, eventually

TEAM = {"supervisor", "triage", "payments", "tech_support", "account_manager"}
PROCESSES = TEAM | {"router", "api"}
"""What `corral up` runs on the sample team."""


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    state_dir: Path
    env: dict[str, str]
    configured_database_url: str | None
    log: Path
    config: Path = SAMPLE_CONFIG

    def runtime(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / "runtime.json").read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    @property
    def nats_url(self) -> str:
        runtime = self.runtime()
        assert runtime is not None
        return str(runtime["nats_url"])

    def child(self, name: str) -> dict[str, Any]:
        runtime = self.runtime()
        assert runtime is not None
        return next(c for c in runtime["children"] if c["name"] == name)

    def seed(self, identity: str) -> str:
        return str(self.state_dir / "creds" / f"{identity}.nk")

    async def connect(self, identity: str = "client") -> Bus:
        """A bus connection holding ``identity``'s seed (an open server needs none)."""
        seed = self.state_dir / "creds" / f"{identity}.nk"
        return await connect(
            BusConfig(
                servers=[self.nats_url],
                identity=identity,
                nkey_seed_file=str(seed) if seed.exists() else None,
                reconnect_forever=False,
            )
        )

    @property
    def database_url(self) -> str:
        """The owner's DSN: the one the test gave, else the embedded PostgreSQL's."""
        if self.configured_database_url is not None:
            return self.configured_database_url
        url = embedded_database_url(self.state_dir)
        assert url is not None, "the embedded PostgreSQL is not running"
        return url

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run one query against the stack's database."""
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    def corral(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral.supervisor", *args, "-c", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


def sample_team(directory: Path, changes: dict[str, Any]) -> Path:
    """The sample team copied into ``directory``, with ``changes`` set in its corral.yaml
    (each a top-level section, merged key by key into the sample's); the config file."""
    shutil.copytree(SAMPLE_CONFIG.parent, directory)
    path = directory / "corral.yaml"
    config = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@asynccontextmanager
async def running_stack(
    state: Path,
    database_url: str | None,
    nats_url: str | None,
    config: Path = SAMPLE_CONFIG,
    *,
    monitor: bool = True,
    environment: Mapping[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """`corral up` on ``config`` (the sample team); embedded NATS unless ``nats_url`` is given,
    embedded PostgreSQL if ``database_url`` is None.

    With ``monitor`` (the tests' default, not corral's) the embedded nats-server serves its
    monitoring endpoint on a free loopback port (``runtime.json``'s ``nats_monitor_url``).
    ``environment`` adds to (or overrides) the stack's environment.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {"NATS_URL", "DATABASE_URL", "CORRAL_CREDS", "CORRAL_NATS_MONITOR_PORT", "CORRAL_API_PORT"}
    }
    env["CORRAL_STATE_DIR"] = str(state)
    # A provider key as a user's shell would hold one: only the model gateway may see it.
    env.setdefault("OPENAI_API_KEY", "sk-test-not-for-agents")
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if monitor:
        env["CORRAL_NATS_MONITOR_PORT"] = "0"
    env["CORRAL_API_PORT"] = "0"  # a free port: stacks of tests never collide on the API's
    if nats_url is not None:
        env["NATS_URL"] = nats_url
    env.update(environment or {})
    log = state / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral.supervisor", "up", "-c", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack = Stack(process, state, env, database_url, log, config)

    def _all_serving() -> bool:
        # Serving, not merely started: a process that has started may not yet answer on its
        # subjects (the supervisor's gateway, say), and a test's first request would find no
        # responders.
        assert process.poll() is None, log.read_text()
        runtime = stack.runtime()
        return bool(runtime and {c["role"] for c in runtime["children"] if c["ready"]} >= PROCESSES)

    try:
        await eventually(_all_serving, timeout=120, message="every process of corral up serving")
        yield stack
        down = await asyncio.to_thread(stack.corral, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "corral stopped" in down.stdout
        assert process.wait(60) == 0
        assert not (state / "runtime.json").exists()
    finally:
        if process.poll() is None:
            # A failed test: stop the stack as `corral down` would (its servers with it), and
            # kill it only if it does not stop.
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

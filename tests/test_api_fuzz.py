"""schemathesis against the live API of a real stack, from the API's own OpenAPI document:
whatever it sends, no 5xx, every status and body as the document says, and nothing in
PostgreSQL but the conversations the API accepted. Each operation alone, then statefully:
the document links a start's conversation to the operations on it, and schemathesis
chains them (start, then read, message, kill what it started)."""

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
    chained: int = 0
    """Calls the stateful run made on a conversation it had started, that found it."""


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


LIVE_FEED = "/v1/console/events"
"""The console's live feed never ends (a conversation's events end with it): a fuzzer would
read it until its timeout. tests/test_console.py reads it in a browser."""


def _document(fuzzed: Fuzzed) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json").exclude(path=LIVE_FEED)


@pytest.fixture(scope="module")
def api_schema(fuzzed: Fuzzed) -> schemathesis.BaseSchema:
    return _document(fuzzed)


schema = schemathesis.pytest.from_fixture("api_schema")


def _key(fuzzed: Fuzzed, path: str) -> str:
    """The operator's key for the operators' endpoints, the client's for the others."""
    operators = ("/v1/queue", "/v1/approvals", "/v1/agents", "/v1/console")
    operator = path.startswith(operators) or path.endswith("/kill")
    return fuzzed.operator_key if operator else fuzzed.client_key


def _accepted(fuzzed: Fuzzed, case: schemathesis.Case, status: int, body: object) -> None:
    if case.method == "POST" and case.path == "/v1/conversations" and status in (201, 202):
        assert isinstance(body, dict)
        fuzzed.accepted.append(body["conversation"])


@schema.parametrize()
@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_whatever_it_is_sent_the_api_answers_as_its_document_says(
    case: schemathesis.Case, fuzzed: Fuzzed
) -> None:
    if case.path == LIVE_FEED:
        pytest.skip("the live feed never ends (see LIVE_FEED)")
    headers = {"Authorization": f"Bearer {_key(fuzzed, case.path)}"}
    response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
    _accepted(fuzzed, case, response.status_code, response.json() if response.content else None)


def test_chained_calls_answer_as_the_document_says(fuzzed: Fuzzed) -> None:
    """Stateful: schemathesis follows the document's links from each start it made."""
    machine = _document(fuzzed).as_state_machine()

    class Chained(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, object]:
            return {"headers": {"Authorization": f"Bearer {_key(fuzzed, case.path)}"}, "timeout": 60}

        def validate_response(self, response: object, case: schemathesis.Case, **kwargs: object) -> None:
            case.validate_response(response, checks=CHECKS)  # type: ignore[arg-type]

        def after_call(self, response: object, case: schemathesis.Case) -> None:
            status = response.status_code  # type: ignore[attr-defined]
            _accepted(fuzzed, case, status, response.json() if status in (201, 202) else None)  # type: ignore[attr-defined]
            if "{conversation}" in case.path and case.path_parameters.get("conversation") in fuzzed.accepted:
                fuzzed.chained += status < 400

    Chained.run(
        settings=settings(
            max_examples=8,
            stateful_step_count=4,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert fuzzed.chained > 0, "the stateful run never followed a link to a conversation it started"


async def test_nothing_but_the_accepted_conversations_reached_postgresql(fuzzed: Fuzzed) -> None:
    assert fuzzed.accepted, "the fuzzing started no conversation at all"

    async def recorded() -> bool:
        rows = await fuzzed.stack.sql("SELECT id FROM conversations")
        return {r["id"] for r in rows} == set(fuzzed.accepted)

    await eventually(recorded, timeout=60, message="exactly the accepted conversations are recorded")
    keys = await fuzzed.stack.sql("SELECT count(*) AS n FROM api_keys")
    assert keys[0]["n"] == 2

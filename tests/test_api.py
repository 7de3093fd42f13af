"""The HTTP/SSE API end to end under `corral up` (real nats-server, PostgreSQL, and the API
process on a free loopback port), as a web chat and a help desk use it: keys per client
and customer, a conversation over HTTP with its events over SSE (resumed with
Last-Event-ID: nothing missed, nothing twice), problem details for bad input, the
operator endpoints behind an operator's key, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from corral.bus import ApprovalVerdict, OperatorAnswer, request, subjects
from tests.conftest import eventually
from tests.stack import Stack, running_stack, sample_team


@dataclass
class Api:
    stack: Stack
    url: str
    keys: dict[str, str]

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
async def api(postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    from tests.conftest import _fresh_database

    config = sample_team(
        tmp_path_factory.mktemp("api") / "support",
        {
            # A rate no test reaches but the flood: 8 at once, then one every 2 s.
            "api": {"port": 0, "rate_per_s": 0.5, "burst": 8},
            # Each client runs 8 conversations at once; the rest wait their turn.
            "conversation": {"max_running_per_client": 8},
            # Only the help desk decides for humans and for account_manager (an operator's
            # --by, an API key's client).
            "tools": {"approvers": {"human": ["desk"], "account_manager": ["desk"]}},
        },
    )
    database = await _fresh_database(postgres_admin_dsn)
    async with running_stack(tmp_path_factory.mktemp("state"), database, None, config) as stack:
        runtime = stack.runtime()
        assert runtime is not None and runtime["api_url"], runtime
        keys = {}
        for name, args in {
            "ana": ["--client", "web", "--customer", "cus_1001"],
            "ben": ["--client", "web", "--customer", "cus_1002"],
            "dee": ["--client", "web", "--customer", "cus_1005"],
            "other": ["--client", "shop", "--customer", "cus_1001"],
            "desk": ["--client", "desk", "--operator"],
            "web": ["--client", "web"],  # a web chat before login: no customer
        }.items():
            made = stack.corral("api-key", "create", *args, "--json")
            assert made.returncode == 0, made.stdout + made.stderr
            keys[name] = json.loads(made.stdout)["key"]
        yield Api(stack, runtime["api_url"], keys)


async def _events(
    client: httpx.AsyncClient, conversation: str, *, last: str | None = None, until: str
) -> list[dict[str, Any]]:
    """Read the conversation's SSE stream until an event of kind ``until`` (inclusive)."""
    headers = {"Last-Event-ID": last} if last else {}
    events: list[dict[str, Any]] = []
    event: dict[str, Any] = {}
    async with client.stream("GET", f"/v1/conversations/{conversation}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line:
                if "data" in event:
                    events.append(event)
                    if event.get("event") == until:
                        return events
                event = {}
                continue
            field, _, value = line.partition(":")
            if field in ("id", "event", "data"):
                event[field] = value.strip() if field != "data" else json.loads(value)
    return events


async def test_a_conversation_over_http_with_its_events_over_sse(api: Api) -> None:
    async with api.client("ana") as ana:
        started = await ana.post("/v1/conversations", json={"text": "I was charged twice, please refund"})
        assert started.status_code == 201, started.text
        conversation = started.json()["conversation"]
        assert started.json()["events"] == f"/v1/conversations/{conversation}/events"
        events = await _events(ana, conversation, until="conversation.ended")
        ended = events[-1]["data"]
        assert (ended["status"], [h["agent"] for h in ended["path"]]) == (
            "replied",
            ["triage", "payments", "account_manager"],
        )
        assert all(e["id"].isdigit() for e in events if e["event"] == "conversation.ended")
        got = await ana.get(f"/v1/conversations/{conversation}")
        assert got.status_code == 200
        view = got.json()
        assert (view["status"], view["customer"], view["current_agent"]) == (
            "replied",
            "cus_1001",
            "account_manager",
        )
        assert [t["role"] for t in view["transcript"]] == ["customer", "agent"]
        assert view["reply"] == view["transcript"][-1]["text"]


async def test_a_key_sees_only_its_own_clients_and_customers_conversations(api: Api) -> None:
    async with api.client("ana") as ana:
        started = await ana.post("/v1/conversations", json={"text": "what plan am I on?"})
        conversation = started.json()["conversation"]
        # Naming another customer than the key's is refused.
        refused = await ana.post(
            "/v1/conversations", json={"text": "refund order 1005", "customer": "cus_1002"}
        )
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["detail"] == "this API key acts for customer cus_1001 only"
    for other in ("ben", "other"):  # another customer of the client; the same customer of another client
        async with api.client(other) as client:
            for response in (
                await client.get(f"/v1/conversations/{conversation}"),
                await client.post(f"/v1/conversations/{conversation}/messages", json={"text": "hi"}),
                await client.get(f"/v1/conversations/{conversation}/events"),
            ):
                # 404, not 403: whether the conversation exists is not told.
                assert response.status_code == 404, response.text
                assert response.json() == {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": f"no conversation {conversation!r}",
                }


async def test_sse_resumed_with_last_event_id_misses_nothing_and_repeats_nothing(api: Api) -> None:
    async with api.client("dee") as dee:
        started = await dee.post(
            "/v1/conversations", json={"text": "My blender arrived broken, I want my money back"}
        )
        conversation = started.json()["conversation"]
        first = await _events(dee, conversation, until="conversation.awaiting")
        asked = first[-1]
        assert asked["data"]["text"] == "Sorry to hear that! Which order was it? Please send its number."
        # Away: the customer answers, and the conversation goes on while nobody listens.
        sent = await dee.post(
            f"/v1/conversations/{conversation}/messages", json={"text": "It was order 2001", "id": "m-dee-1"}
        )
        assert sent.status_code == 202 and sent.json()["message_id"] == "m-dee-1"
        rest = await _events(dee, conversation, last=asked["id"], until="conversation.ended")
        whole = await _events(dee, conversation, until="conversation.ended")
    stored = [e["id"] for e in whole if "id" in e]
    resumed = [e["id"] for e in first if "id" in e] + [e["id"] for e in rest if "id" in e]
    assert resumed == stored, (first, rest, whole)
    assert len(set(resumed)) == len(resumed)
    assert rest[-1]["data"]["status"] == "replied"


async def test_bad_requests_get_problem_details_never_a_5xx(api: Api) -> None:
    async with api.client(None) as anonymous:
        missing = await anonymous.post("/v1/conversations", json={"text": "hi"})
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        assert (await anonymous.get("/v1/nothing")).status_code == 404
    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": "Bearer ck_0000_not-a-key-at-all"}
    ) as forged:
        assert (await forged.get("/v1/queue")).status_code == 401
    async with api.client("ana") as ana:
        cases = [
            (b"{not json", 422),
            (b'{"text": ""}', 422),
            (b'{"text": "hi", "extra": 1}', 422),
            (json.dumps({"text": "x" * 70000}).encode(), 413),
        ]
        for body, status in cases:
            response = await ana.post(
                "/v1/conversations", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == status, (body[:40], response.text)
            assert response.json()["status"] == status
        assert (await ana.get("/v1/conversations/not%20an%20id")).status_code == 404
        assert (await ana.delete("/v1/conversations")).status_code == 405


async def test_operator_endpoints_need_an_operators_key_and_take_over_a_conversation(api: Api) -> None:
    async with api.client("ana") as ana, api.client("desk") as desk:
        assert (await ana.get("/v1/queue")).status_code == 401
        started = await ana.post("/v1/conversations", json={"text": "My lawyer says I should sue you"})
        conversation = started.json()["conversation"]
        escalated = await _events(ana, conversation, until="conversation.ended")
        assert escalated[-1]["data"]["status"] == "escalated"
        queue = await desk.get("/v1/queue")
        assert conversation in [item["conversation"] for item in queue.json()["items"]]
        claimed = await desk.post(f"/v1/queue/{conversation}/claim")
        assert claimed.status_code == 200 and claimed.json()["claimed_by"] == "desk", claimed.text
        again = await desk.post(f"/v1/queue/{conversation}/handback", json={"agent": "tech_support"})
        assert again.status_code == 409 and "not an edge from human" in again.json()["detail"]
        last = escalated[-1]["id"]
        replied = await desk.post(
            f"/v1/queue/{conversation}/reply", json={"text": "A colleague will call you."}
        )
        assert replied.status_code == 200
        human = await _events(ana, conversation, last=last, until="conversation.awaiting")
        assert (
            human[-1]["data"]["agent"] == "human"
            and human[-1]["data"]["text"] == "A colleague will call you."
        )
        # While the customer has not answered, the operator who holds the claim may follow
        # up, and close it; nobody else may.
        follow_up = await desk.post(f"/v1/queue/{conversation}/reply", json={"text": "Tomorrow at 10."})
        assert follow_up.status_code == 200, follow_up.text
        second = await _events(ana, conversation, last=human[-1]["id"], until="conversation.awaiting")
        assert second[-1]["data"]["text"] == "Tomorrow at 10."
        closed = await desk.post(f"/v1/queue/{conversation}/close", json={"note": "call booked"})
        assert closed.status_code == 200, closed.text
        end = await _events(ana, conversation, last=second[-1]["id"], until="conversation.ended")
        assert end[-1]["data"]["status"] == "closed"


async def test_an_approval_is_decided_only_by_its_approvers_and_resumes_the_conversation(api: Api) -> None:
    async with api.client("ana") as ana, api.client("desk") as desk:
        started = await ana.post("/v1/conversations", json={"text": "Please refund order 1002"})
        conversation = started.json()["conversation"]
        waiting = await _events(ana, conversation, until="conversation.waiting")
        approval = waiting[-1]["data"]["approval_id"]
        pending = (await desk.get("/v1/approvals")).json()["items"]
        (listed,) = [a for a in pending if a["conversation"] == conversation]
        # account_manager's approval (P-51), or a human's once the customer refunded today (P-47).
        assert (listed["id"], listed["tool"]) == (approval, "refund")
        approver = listed["approver"]
        assert approver in ("human", "account_manager")
        assert (await ana.post(f"/v1/approvals/{approval}/approve")).status_code == 401
        # tools.approvers: bob decides for neither, at the command line either.
        cli = await asyncio.to_thread(api.stack.corral, "approve", approval, "--by", "bob")
        assert cli.returncode == 1
        assert f"bob may not decide for {approver} (tools.approvers.{approver}: desk)" in cli.stderr
        granted = await desk.post(f"/v1/approvals/{approval}/approve", json={})
        assert granted.status_code == 200 and granted.json() == {"approval": approval, "status": "approved"}
        again = await desk.post(f"/v1/approvals/{approval}/deny", json={"reason": "too late"})
        assert again.status_code == 409
        ended = await _events(ana, conversation, last=waiting[-1]["id"], until="conversation.ended")
    assert ended[-1]["data"]["status"] == "replied"
    refunds = await api.stack.sql("SELECT count(*) AS n FROM shop.refunds WHERE order_id='1002'")
    assert refunds[0]["n"] == 1


async def test_a_flood_from_one_key_is_throttled_with_retry_after(api: Api) -> None:
    async with api.client("ben") as ben:
        statuses = [
            (await ben.post("/v1/conversations", json={"text": "hello"})).status_code for _ in range(12)
        ]
    assert statuses.count(201) >= 8 and 429 in statuses, statuses
    async with api.client("ana") as ana:  # another key is not slowed down
        assert (await ana.post("/v1/conversations", json={"text": "hello"})).status_code == 201


async def test_the_openapi_document_describes_every_endpoint(api: Api) -> None:
    async with api.client(None) as anonymous:
        document = (await anonymous.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {
        "/v1/conversations",
        "/v1/conversations/{conversation}",
        "/v1/conversations/{conversation}/messages",
        "/v1/conversations/{conversation}/events",
        "/v1/queue",
        "/v1/queue/{conversation}/claim",
    }
    start = document["paths"]["/v1/conversations"]["post"]
    assert start["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StartRequest"
    }
    assert document["components"]["schemas"]["StartRequest"]["additionalProperties"] is False


async def _awaiting(client: httpx.AsyncClient, conversation: str, turns: int) -> dict[str, Any]:
    """The conversation once it awaits its customer with ``turns`` turns said (tool calls aside)."""

    async def asked() -> dict[str, Any] | None:
        view = (await client.get(f"/v1/conversations/{conversation}")).json()
        return view if view["status"] == "awaiting_customer" and len(view["transcript"]) == turns else None

    return await eventually(asked, message=f"{conversation} awaiting its customer after {turns} turns")


async def test_an_anonymous_conversation_is_bound_once_from_the_authenticating_tools_result(api: Api) -> None:
    """verify_customer (tools.authenticating) binds the customer from its own result: not
    from a wrong pair, once, never to another; the refund that follows acts for them."""
    async with api.client("web") as web:
        started = await web.post(
            "/v1/conversations", json={"text": "Hi. My email is ben@example.com and my order is 2030."}
        )
        conversation = started.json()["conversation"]
        view = await _awaiting(web, conversation, 2)
        assert view["customer"] == "" and view["reply"].startswith("Sorry, no account")
        for turns, text in (
            (4, "My email is dee@example.com and my order is 2030."),
            (6, "My email is ben@example.com and my order is 1005."),  # ben's, but too late
        ):
            await web.post(f"/v1/conversations/{conversation}/messages", json={"text": text})
            view = await _awaiting(web, conversation, turns)
            assert view["customer"] == "cus_1005", view
        await web.post(
            f"/v1/conversations/{conversation}/messages", json={"text": "Please refund order 2030, it broke"}
        )

        async def ended() -> dict[str, Any] | None:
            view = (await web.get(f"/v1/conversations/{conversation}")).json()
            return view if view["status"] == "replied" else None

        assert (await eventually(ended, timeout=60))["customer"] == "cus_1005"
    refunds = await api.stack.sql("SELECT count(*) AS n FROM shop.refunds WHERE order_id='2030'")
    assert refunds[0]["n"] == 1  # policy let it: the order is the bound customer's
    audit = await api.stack.sql(
        "SELECT outcome, on_behalf_of, detail FROM audit_log WHERE conversation=$1"
        " AND decision='bind_customer' ORDER BY id",
        conversation,
    )
    assert [(r["outcome"], r["on_behalf_of"]) for r in audit] == [
        ("applied", "cus_1005"),
        ("refused", "cus_1005"),
    ]
    assert "cus_1002" in audit[1]["detail"] and "never changes" in audit[1]["detail"]


async def _cancellation(ana: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    """ana asks to cancel sub_1: account_manager's call waits for the customer (P-64)."""
    started = await ana.post("/v1/conversations", json={"text": "Please cancel my subscription sub_1"})
    conversation = started.json()["conversation"]
    waiting = await _events(ana, conversation, until="conversation.waiting")
    view = (await ana.get(f"/v1/conversations/{conversation}")).json()
    assert view["pending_approval"]["approver"] == "customer", view
    assert view["pending_approval"]["id"] == waiting[-1]["data"]["approval_id"]
    return conversation, waiting[-1]


async def test_a_customers_approval_is_theirs_alone_and_a_denial_lets_the_model_change_its_call(
    api: Api,
) -> None:
    async with api.client("ana") as ana, api.client("desk") as desk, api.client("ben") as ben:
        conversation, waiting = await _cancellation(ana)
        approval = waiting["data"]["approval_id"]
        operator = await desk.post(f"/v1/approvals/{approval}/approve", json={})
        assert operator.status_code == 409 and "the customer's to decide" in operator.json()["detail"]
        cli = await asyncio.to_thread(api.stack.corral, "approve", approval, "--by", "desk")
        assert cli.returncode == 1 and "the customer's to decide" in cli.stderr
        other = await ben.post(f"/v1/conversations/{conversation}/approvals/{approval}/approve", json={})
        assert other.status_code == 404  # another customer's conversation: not even there
        # The operators' NATS identity cannot speak for the customer either.
        admin = await api.stack.connect("admin")
        try:
            forged = ApprovalVerdict(
                approval_id=approval, approve=True, by="customer cus_1001", customer="cus_1001"
            )
            refused = await request(
                admin.nc, subjects.operator_requests(), forged, OperatorAnswer, timeout_s=30
            )
        finally:
            await admin.close()
        assert refused.status == "refused" and "only the API speaks for a customer" in refused.reason
        denied = await ana.post(
            f"/v1/conversations/{conversation}/approvals/{approval}/deny", json={"reason": "I'll keep it"}
        )
        assert denied.status_code == 200, denied.text
        ended = await _events(ana, conversation, last=waiting["id"], until="conversation.ended")
    assert ended[-1]["data"]["status"] == "replied"
    assert ended[-1]["data"]["reply"].startswith("Your subscription stays active")
    rows = await api.stack.sql(
        "SELECT (SELECT status FROM shop.subscriptions WHERE id='sub_1') AS sub,"
        " (SELECT decided_by FROM approvals WHERE id=$1) AS by",
        approval,
    )
    assert (rows[0]["sub"], rows[0]["by"]) == ("active", "customer cus_1001")
    tools = await api.stack.sql(
        "SELECT tool, status FROM tool_ledger WHERE conversation=$1 ORDER BY created_at", conversation
    )
    assert [(r["tool"], r["status"]) for r in tools] == [
        ("cancel_subscription", "denied"),
        ("send_email", "ok"),
    ]


async def test_a_customers_approval_granted_through_the_api_applies_the_call(api: Api) -> None:
    async with api.client("ana") as ana:
        conversation, waiting = await _cancellation(ana)
        approval = waiting["data"]["approval_id"]
        granted = await ana.post(f"/v1/conversations/{conversation}/approvals/{approval}/approve", json={})
        assert granted.status_code == 200 and granted.json() == {"approval": approval, "status": "approved"}
        ended = await _events(ana, conversation, last=waiting["id"], until="conversation.ended")
    assert ended[-1]["data"]["reply"] == "Your subscription is cancelled."
    rows = await api.stack.sql("SELECT status FROM shop.subscriptions WHERE id='sub_1'")
    assert rows[0]["status"] == "cancelled"


async def _status(api: Api) -> dict[str, Any]:
    done = await asyncio.to_thread(api.stack.corral, "status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


async def test_an_operator_kills_and_revives_an_agent_and_kills_a_conversation(api: Api) -> None:
    async with api.client("desk") as desk, api.client("ana") as ana:
        assert (await ana.post("/v1/agents/tech_support/kill", json={})).status_code == 401
        unknown = await desk.post("/v1/agents/nobody/kill", json={})
        assert unknown.status_code == 404 and "no agent 'nobody'" in unknown.json()["detail"]
        killed = await desk.post("/v1/agents/tech_support/kill", json={"reason": "bad deploy"})
        try:
            assert killed.status_code == 200, killed.text
            assert killed.json() == {"target": "agent", "name": "tech_support", "status": "killed"}
            processes = {p["name"]: p for p in (await _status(api))["processes"]}
            assert processes["tech_support"]["state"] == "killed"
            assert processes["tech_support"]["killed"] == {
                **processes["tech_support"]["killed"],
                "by": "desk",
                "reason": "bad deploy",
            }
            started = await ana.post("/v1/conversations", json={"text": "The app crashed again"})
            conversation = started.json()["conversation"]
            ended = await _events(ana, conversation, until="conversation.ended")
            assert ended[-1]["data"]["status"] == "escalated"  # nothing goes to a killed agent
            assert "tech_support" in ended[-1]["data"]["reason"]
        finally:
            revived = await desk.post("/v1/agents/tech_support/revive", json={})
        assert revived.json() == {"target": "agent", "name": "tech_support", "status": "revived"}
        again = await desk.post("/v1/agents/tech_support/revive", json={})
        assert again.json()["status"] == "not killed"

        async def alive() -> bool:
            processes = {p["name"]: p for p in (await _status(api))["processes"]}
            return processes["tech_support"]["state"] != "killed"

        await eventually(alive, message="tech_support revived in corral status")
        started = await ana.post("/v1/conversations", json={"text": "My lawyer says I should sue you"})
        conversation = started.json()["conversation"]
        await _events(ana, conversation, until="conversation.ended")
        # A NUL can be neither audited nor shown: refused as the body's fault, never a 5xx.
        nul = await desk.post(f"/v1/conversations/{conversation}/kill", json={"reason": "spam\u0000"})
        assert nul.status_code == 422 and "reason" in nul.json()["detail"], nul.text
        stopped = await desk.post(f"/v1/conversations/{conversation}/kill", json={"reason": "spam"})
        assert stopped.json() == {"target": "conversation", "name": conversation, "status": "killed"}
        missing = await desk.post("/v1/conversations/c-nosuch/kill", json={})
        assert missing.status_code == 404
    audit = await api.stack.sql(
        "SELECT agent, action, outcome FROM audit_log"
        " WHERE action LIKE 'kill.%' OR action LIKE 'revive.%' ORDER BY id"
    )
    assert [tuple(r) for r in audit] == [
        (
            "desk",
            "kill.agent",
            "refused: no agent 'nobody' (the team's: account_manager, payments, tech_support, triage)",
        ),
        ("desk", "kill.agent", "applied"),
        ("desk", "revive.agent", "applied"),
        ("desk", "revive.agent", "applied: was not killed"),
        ("desk", "kill.conversation", "applied"),
        ("desk", "kill.conversation", "refused: no conversation 'c-nosuch'"),
    ]


async def test_a_flood_of_starts_from_one_client_does_not_make_another_wait_behind_it(api: Api) -> None:
    """200 starts from the NATS client at once: 8 run, the rest wait (queued, in order);
    another client's start goes to the agents at once and ends while the flood still
    waits; and every one of the flood is admitted and ends in the end."""
    from corral.supervisor.core._client import start_conversation

    flooder = await api.stack.connect()
    try:
        flood = await asyncio.gather(
            *(start_conversation(flooder, "What plan am I on?", customer="cus_1002") for _ in range(200))
        )
    finally:
        await flooder.close()
    async with api.client("ana") as ana:
        started = await ana.post("/v1/conversations", json={"text": "What plan am I on?"})
        assert started.status_code == 201, started.text
        ended = await _events(ana, started.json()["conversation"], until="conversation.ended")
    assert ended[-1]["data"]["status"] == "replied"
    rows = await api.stack.sql(
        "SELECT count(*) FILTER (WHERE status = 'queued') AS queued,"
        " count(*) FILTER (WHERE status = 'running') AS running"
        " FROM conversations WHERE id = ANY($1::text[])",
        flood,
    )
    assert rows[0]["queued"] > 0, rows  # the other client did not wait for the flood
    assert rows[0]["running"] <= 8 + 64  # the share (and the starts decided at the same moment)
    # The queue is PostgreSQL's: a supervisor killed now admits the rest once restarted.
    os.kill(api.stack.child("supervisor")["pid"], signal.SIGKILL)

    async def drained() -> bool:
        left = await api.stack.sql(
            "SELECT count(*) AS n FROM conversations WHERE id = ANY($1::text[]) AND status <> 'replied'",
            flood,
        )
        return left[0]["n"] == 0

    await eventually(drained, timeout=120, interval=0.5, message="every start of the flood replied")
    steps = await api.stack.sql(
        "SELECT count(*) AS n FROM conversation_steps"
        " WHERE conversation = ANY($1::text[]) AND kind = 'queued'",
        flood,
    )
    assert steps[0]["n"] > 0

"""The console's endpoints: the page itself (static files, no build step), what it shows
(``/v1/console/...``, an operator's key, read through the supervisor's API desk), its live
feed over SSE, and the one-time login that gives an operator a key for it.

The console's actions are the operators' endpoints everyone uses (approve, deny, claim,
reply, hand back, kill, revive), with the key the login gave: each is in the audit chain
under the operator's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from corral.bus import ConsoleQuery, ConsoleView, LoginGranted, LoginRedeem, subjects
from corral.supervisor.api._keys import digest, new_key
from corral.supervisor.api._openapi import Endpoint
from corral.supervisor.api._operators import OperatorEndpoints
from corral.supervisor.api._problems import ApiProblem

STATIC = Path(__file__).parent / "console"
"""The page: HTML, CSS and JavaScript written for corral, served as they are."""

PAGE_HEADERS = {
    # Only the page's own files run, style it and are fetched; nothing frames it (its Kill
    # and Approve buttons cannot be clicked through another site's page); nothing leaks
    # where it was opened from.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""What the console's files are served with: it holds an operator's key."""

_FEED_EVERY_S = 0.25
"""The live feed gathers what changed this long, then says it in one event."""


class LoginRequest(BaseModel):
    login: str = Field(min_length=16, max_length=128, description="The one-time login `corral up` printed.")


class LoginDone(BaseModel):
    key: str
    operator: str


class Items(BaseModel):
    items: list[dict[str, Any]]


class _Tagged(msgspec.Struct):
    type: str = ""


_tagged = msgspec.json.Decoder(_Tagged)


class ConsoleEndpoints(OperatorEndpoints):
    """The console (see the module)."""

    async def _console(self, request: Request, query: ConsoleQuery) -> list[dict[str, Any]]:
        await self._key(request, operator=True)
        return (await self._ask(query, ConsoleView)).items

    async def console_login(self, request: Request) -> Response:
        body = await self._body(request, LoginRequest)
        made = new_key()
        granted = await self._ask(
            LoginRedeem(login_digest=digest(body.login), key_id=made.key_id, key_digest=made.digest),
            LoginGranted,
        )
        if not granted.granted:
            raise ApiProblem(
                401, f"console login refused: {granted.reason}; `corral console-login` prints a new one"
            )
        return JSONResponse(LoginDone(key=made.key, operator=granted.operator).model_dump())

    async def console_conversations(self, request: Request) -> Response:
        params = request.query_params
        limit = params.get("limit", "100")
        query = ConsoleQuery(
            topic="conversations",
            status=params.get("status", "")[:32],
            agent=params.get("agent", "")[:64],
            limit=int(limit) if limit.isdigit() else 100,
        )
        return JSONResponse(Items(items=await self._console(request, query)).model_dump(mode="json"))

    async def console_conversation(self, request: Request) -> Response:
        conversation = request.path_params["conversation"]
        if not subjects.is_id(conversation):
            raise ApiProblem(404, f"no conversation {conversation!r}")
        items = await self._console(request, ConsoleQuery(topic="trace", conversation=conversation))
        if not items:
            raise ApiProblem(404, f"no conversation {conversation!r}")
        return JSONResponse(items[0])

    async def console_graph(self, request: Request) -> Response:
        counts = {
            (c["agent"], c["target"]): c for c in await self._console(request, ConsoleQuery(topic="graph"))
        }
        info = self._settings.console
        edges = []
        for source, targets in info.edges.items():
            for target in targets:
                seen = counts.pop((source, target), {})
                edges.append(
                    {
                        "from": source,
                        "to": target,
                        "handoffs": seen.get("handoffs", 0),
                        "refusals": seen.get("refusals", 0),
                    }
                )
        # Refused handoffs toward targets the graph does not allow are edges too (refused).
        for (source, target), seen in counts.items():
            edges.append(
                {"from": source, "to": target, "handoffs": 0, "refusals": seen["refusals"], "allowed": False}
            )
        return JSONResponse({"entry": info.entry, "agents": sorted(info.replicas), "edges": edges})

    async def console_agents(self, request: Request) -> Response:
        rows = await self._console(request, ConsoleQuery(topic="agents"))
        items = [{**row, "replicas": self._settings.console.replicas.get(row["agent"], 1)} for row in rows]
        return JSONResponse(Items(items=items).model_dump(mode="json"))

    async def console_alerts(self, request: Request) -> Response:
        items = await self._console(request, ConsoleQuery(topic="alerts", limit=50))
        return JSONResponse(Items(items=items).model_dump(mode="json"))

    async def console_events(self, request: Request) -> Response:
        await self._key(request, operator=True)
        stream: Response = EventSourceResponse(self._feed(), ping=15, headers={"Cache-Control": "no-store"})
        return stream

    async def _feed(self) -> AsyncIterator[dict[str, Any]]:
        """What changed, every quarter of a second at most: the conversations that had an
        update (their ids and the kinds of update) and the alerts raised."""
        changed: dict[str, set[str]] = {}
        alerts: list[dict[str, Any]] = []
        woken = asyncio.Event()

        async def update(msg: Any) -> None:
            parts = msg.subject.split(".")
            if len(parts) >= 4:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    changed.setdefault(parts[3], set()).add(_tagged.decode(msg.data).type)
                    woken.set()

        async def alert(msg: Any) -> None:
            with contextlib.suppress(ValueError):
                alerts.append(json.loads(msg.data))
                woken.set()

        subs = [
            await self._bus.nc.subscribe(subjects.all_conversation_updates(), cb=update),
            await self._bus.nc.subscribe(subjects.alerts(), cb=alert),
        ]
        try:
            yield {"event": "ready", "data": json.dumps({"at": time.time()})}
            while True:
                await woken.wait()
                woken.clear()
                if changed:
                    data = {c: sorted(kinds) for c, kinds in changed.items()}
                    changed = {}
                    yield {"event": "conversations", "data": json.dumps(data)}
                while alerts:
                    yield {"event": "alert", "data": json.dumps(alerts.pop(0))}
                await asyncio.sleep(_FEED_EVERY_S)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _console_endpoints(self) -> list[Endpoint]:
        """The console's reads and its feed (an operator's key), and its login (none)."""
        console = "/v1/console"
        login = Endpoint(
            "POST",
            f"{console}/login",
            self.console_login,
            "Redeem a one-time console login",
            LoginRequest,
            LoginDone,
            200,
        )
        reads = [
            (
                "conversations",
                self.console_conversations,
                "Conversations, newest first (?status=, ?agent=, ?limit=)",
                Items,
            ),
            (
                "conversations/{conversation}",
                self.console_conversation,
                "A conversation's trace, decisions, tool calls and transcript",
                None,
            ),
            ("graph", self.console_graph, "The handoff graph with its counts and refusals (last 24 h)", None),
            ("agents", self.console_agents, "The agents: state, replicas, rate, spend", Items),
            ("alerts", self.console_alerts, "Recent alerts", Items),
        ]
        return [
            login,
            *(
                Endpoint("GET", f"{console}/{path}", handler, summary, None, response, 200, operator=True)
                for path, handler, summary, response in reads
            ),
            Endpoint(
                "GET",
                f"{console}/events",
                self.console_events,
                "What changes, live (Server-Sent Events)",
                None,
                None,
                200,
                operator=True,
                stream=True,
            ),
        ]


class _PageFiles(StaticFiles):
    """The console's files, with ``PAGE_HEADERS``."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def page_routes() -> list[BaseRoute]:
    """The page: ``/console/`` and its files."""

    async def to_console(request: Request) -> Response:
        return RedirectResponse("/console/")

    return [
        Route("/", to_console, methods=["GET"]),
        Route("/console", to_console, methods=["GET"]),
        Mount("/console", app=_PageFiles(directory=STATIC, html=True), name="console"),
    ]

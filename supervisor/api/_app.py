"""The API's endpoints (starlette): conversations for clients, the human queue for
operators, the OpenAPI document. See ``supervisor.api`` for what the process holds."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from corral.bus import (
    ApprovalVerdict,
    ConversationEnded,
    ConversationQuery,
    ConversationRecorded,
    ConversationStart,
    ConversationView,
)
from corral.supervisor.api import _models as m
from corral.supervisor.api._base import ApiSettings
from corral.supervisor.api._console import ConsoleEndpoints, page_routes
from corral.supervisor.api._events import conversation_events
from corral.supervisor.api._openapi import Endpoint, openapi
from corral.supervisor.api._operators import verdict_endpoints
from corral.supervisor.api._problems import ApiProblem, on_http_error, on_problem
from corral.supervisor.core._client import send_message, start_conversation, watching

__all__ = ["Api", "ApiSettings"]


class Api(ConsoleEndpoints):
    """Every endpoint over one bus connection (the API's identity)."""

    # --- client endpoints -----------------------------------------------------------

    async def start(self, request: Request) -> Response:
        key = await self._key(request)
        body = await self._body(request, m.StartRequest)
        if key.customer and body.customer not in (None, key.customer):
            raise ApiProblem(403, f"this API key acts for customer {key.customer} only")
        customer = key.customer or body.customer or ""
        self._text_fits(body.text)
        self._throttle(key)
        conversation = f"c-{uuid.uuid4().hex[:20]}"
        start = ConversationStart(
            conversation=conversation, text=body.text, customer=customer, dry_run=body.dry_run
        )
        recorded = await self._started(key.client, start)
        events = f"/v1/conversations/{conversation}/events"
        started = m.Started(
            conversation=conversation, events=events, status="started" if recorded else "queued"
        )
        return JSONResponse(started.model_dump(), status_code=201 if recorded else 202)

    async def _started(self, client: str, start: ConversationStart) -> bool:
        """Publish ``start`` and wait until the supervisor recorded it (True), so that what
        the client does next finds it; or until ``request_timeout_s`` (False: it is queued
        behind others, and will be). A refused start is answered 422 with the reason.

        The supervisor says when it recorded a start (``ConversationRecorded``, live); the
        API also asks, now and then, in case that news was lost on the way."""
        conversation = start.conversation
        async with watching(
            self._bus, conversation, settled=(ConversationRecorded, ConversationEnded), client=client
        ) as settled:
            await self._stored(
                start_conversation(
                    self._bus,
                    start.text,
                    customer=start.customer,
                    conversation=conversation,
                    client=client,
                    dry_run=start.dry_run,
                )
            )
            deadline, pause = time.monotonic() + self._settings.request_timeout_s, 0.25
            while time.monotonic() < deadline:
                await asyncio.wait({settled}, timeout=pause)
                if not settled.done():
                    view = await self._ask(ConversationQuery(conversation=conversation), ConversationView)
                    if view.found:
                        return True
                    pause = min(pause * 2, 1.0)
                    continue
                update = settled.result()
                if isinstance(update, ConversationEnded) and update.status == "refused":
                    raise ApiProblem(422, f"the conversation was refused: {update.reason or 'refused'}")
                return True
            return False

    async def message(self, request: Request) -> Response:
        key = await self._key(request)
        conversation = request.path_params["conversation"]
        body = await self._body(request, m.MessageRequest)
        await self._visible(key, conversation)
        self._text_fits(body.text)
        self._throttle(key)
        message_id = await self._stored(
            send_message(self._bus, conversation, body.text, client=key.client, message_id=body.id)
        )
        sent = m.MessageSent(conversation=conversation, message_id=message_id)
        return JSONResponse(sent.model_dump(), status_code=202)

    async def conversation(self, request: Request) -> Response:
        key = await self._key(request)
        view = await self._visible(key, request.path_params["conversation"])
        data = msgspec.to_builtins(view)
        shown = m.Conversation.model_validate(
            {k: v for k, v in data.items() if k in m.Conversation.model_fields}
            # What was said; the agents' tool calls are the operators' to see (`corral show`).
            | {
                "transcript": [
                    {k: t.get(k, "") for k in ("role", "text", "agent")}
                    for t in data["transcript"]
                    if t["role"] != "tool"
                ]
            }
        )
        return JSONResponse(shown.model_dump(mode="json"))

    async def events(self, request: Request) -> Response:
        key = await self._key(request)
        conversation = request.path_params["conversation"]
        await self._visible(key, conversation)
        last = request.headers.get("last-event-id", "").strip()
        after = int(last) if last.isdigit() else None
        source = conversation_events(self._bus, key.client, conversation, after)
        stream: Response = EventSourceResponse(source, ping=15, headers={"Cache-Control": "no-store"})
        return stream

    def _customer_verdict(self, approve: bool) -> Callable[[Request], Awaitable[Response]]:
        """The conversation's customer decides its pending approval (one whose policy names
        ``@approver("customer")``), with the client's key: 404 unless the key may see the
        conversation and the approval is the one it waits on; 409 if it is not the
        customer's to decide."""

        async def decide(request: Request) -> Response:
            key = await self._key(request)
            view = await self._visible(key, request.path_params["conversation"])
            approval = request.path_params["approval"]
            body = await self._body(request, m.VerdictRequest)
            pending = view.pending_approval
            if pending is None or pending.id != approval:
                raise ApiProblem(404, f"no approval {approval!r} pending in conversation {view.conversation}")
            if not view.customer:
                raise ApiProblem(409, f"conversation {view.conversation} has no customer to decide it")
            verdict = ApprovalVerdict(
                approval_id=approval,
                approve=approve,
                by=f"customer {view.customer}",
                customer=view.customer,
                reason=body.reason,
            )
            await self._to_desk(verdict, missing="no approval")
            done = m.VerdictDone(approval=approval, status="approved" if approve else "denied")
            return JSONResponse(done.model_dump())

        return decide

    # --- the app --------------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint, for the routes and for the OpenAPI document: the clients', then
        the operators', then the console's."""
        conv = "/v1/conversations/{conversation}"
        endpoints = [
            Endpoint(
                "POST",
                "/v1/conversations",
                self.start,
                "Start a conversation",
                m.StartRequest,
                m.Started,
                201,
                also=(202,),
                produces="conversation",
            ),
            Endpoint(
                "POST",
                f"{conv}/messages",
                self.message,
                "The customer's next message",
                m.MessageRequest,
                m.MessageSent,
                202,
            ),
            Endpoint(
                "GET",
                conv,
                self.conversation,
                "A conversation: status, path, transcript, cost",
                None,
                m.Conversation,
                200,
            ),
            Endpoint(
                "GET",
                f"{conv}/events",
                self.events,
                "Its events (Server-Sent Events, resumable)",
                None,
                None,
                200,
                stream=True,
            ),
        ]
        endpoints += verdict_endpoints(
            f"{conv}/approvals/{{approval}}",
            self._customer_verdict,
            "the customer's pending approval",
            operator=False,
        )
        return [*endpoints, *self._operator_endpoints(), *self._console_endpoints()]

    def app(self) -> Starlette:
        endpoints = self.endpoints()
        document = openapi(endpoints)

        async def spec(request: Request) -> Response:
            return JSONResponse(document)

        routes: list[BaseRoute] = [Route(e.path, e.handler, methods=[e.method]) for e in endpoints]
        routes.append(Route("/openapi.json", spec, methods=["GET"]))
        routes += page_routes()
        return Starlette(
            routes=routes,
            exception_handlers={ApiProblem: on_problem, HTTPException: on_http_error},
        )

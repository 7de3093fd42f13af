"""The API's endpoints (starlette): conversations for clients, the human queue for
operators, the OpenAPI document. See ``supervisor.api`` for what the process holds."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.bus import (
    ApiRequest,
    ApprovalsQuery,
    ApprovalsView,
    ApprovalVerdict,
    Bus,
    BusError,
    ClientUpdate,
    ConversationEnded,
    ConversationQuery,
    ConversationStart,
    ConversationView,
    KeyCheck,
    KeyInfo,
    Limits,
    OperatorAction,
    OperatorAnswer,
    OperatorRequest,
    QueueQuery,
    QueueView,
    request,
    subjects,
)
from corral.supervisor.api import _models as m
from corral.supervisor.api._events import conversation_events
from corral.supervisor.api._keys import digest, looks_like_key
from corral.supervisor.api._openapi import Endpoint, openapi
from corral.supervisor.api._problems import ApiProblem, on_http_error, on_problem
from corral.supervisor.core._client import send_message, start_conversation

_M = TypeVar("_M", bound=BaseModel)
_A = TypeVar("_A", bound=msgspec.Struct)
_T = TypeVar("_T")
_updates = msgspec.json.Decoder(ClientUpdate)

_RETRY = {"Retry-After": "1"}

KEY_CACHE_S = 10.0
"""How long a checked key is believed without asking again (a revoked key stops within it)."""


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    """What the API is configured with (``api:`` in corral.yaml, and ``limits:``)."""

    limits: Limits
    rate_per_s: float = 20.0
    burst: int = 40
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0


class _Bucket:
    """A token bucket: ``rate`` a second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()

    def take(self) -> float:
        """0 if a token was taken; else the seconds until one will be there."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate


class Api:
    """The endpoints over one bus connection (the API's identity)."""

    def __init__(self, bus: Bus, settings: ApiSettings) -> None:
        self._bus = bus
        self._settings = settings
        self._keys: dict[str, tuple[float, KeyInfo]] = {}
        self._buckets: dict[str, _Bucket] = {}

    # --- plumbing -----------------------------------------------------------------

    async def _ask(self, message: ApiRequest, answer: type[_A]) -> _A:
        return await self._request(subjects.api_requests(), message, answer)

    async def _request(self, subject: str, message: Any, answer: type[_A]) -> _A:
        try:
            return await request(
                self._bus.nc, subject, message, answer, timeout_s=self._settings.request_timeout_s
            )
        except BusError as exc:
            raise ApiProblem(
                503, f"the supervisor is not answering ({exc}); try again", headers=_RETRY
            ) from exc

    async def _key(self, request: Request, *, operator: bool = False) -> KeyInfo:
        """The request's API key (``Authorization: Bearer <key>``), checked."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="corral"'}
        if scheme.lower() != "bearer" or not looks_like_key(key.strip()):
            raise ApiProblem(401, "an API key is required: Authorization: Bearer <key>", headers=challenge)
        hashed = digest(key.strip())
        cached = self._keys.get(hashed)
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_S:
            info = cached[1]
        else:
            info = await self._ask(KeyCheck(digest=hashed), KeyInfo)
            if info.found:
                self._keys[hashed] = (time.monotonic(), info)
        if not info.found:
            raise ApiProblem(401, "the API key is not valid (unknown or revoked)", headers=challenge)
        if operator and not info.operator:
            raise ApiProblem(401, "this endpoint needs an operator's API key", headers=challenge)
        return info

    def _throttle(self, key: KeyInfo) -> None:
        """Each key's starts and messages are rate-limited: one client cannot starve others."""
        bucket = self._buckets.get(key.key_id)
        if bucket is None:
            bucket = self._buckets[key.key_id] = _Bucket(self._settings.rate_per_s, self._settings.burst)
        wait = bucket.take()
        if wait:
            raise ApiProblem(
                429,
                f"too many requests from client {key.client}",
                headers={"Retry-After": f"{wait:.0f}" if wait >= 1 else "1"},
            )

    async def _body(self, request: Request, model: type[_M]) -> _M:
        limit = self._settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiProblem(413, f"the body is over {limit} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiProblem(413, f"the body is over {limit} bytes")
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)[:3]
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
            raise ApiProblem(422, f"invalid body: {detail}") from exc

    def _text_fits(self, text: str) -> None:
        limit = self._settings.limits.customer_text_bytes
        if len(text.encode()) > limit or "\x00" in text:
            raise ApiProblem(
                422, f"invalid body: text: over limits.customer_text_bytes ({limit}) or holds NUL"
            )

    async def _visible(self, key: KeyInfo, conversation: str) -> ConversationView:
        """The conversation, if the key may see it (else 404: whether it exists is not said)."""
        if not subjects.is_id(conversation):
            raise ApiProblem(404, f"no conversation {conversation!r}")
        view = await self._ask(ConversationQuery(conversation=conversation), ConversationView)
        if not view.found or view.client != key.client or (key.customer and view.customer != key.customer):
            raise ApiProblem(404, f"no conversation {conversation!r}")
        return view

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
        behind others, and will be). A refused start is answered 422 with the reason."""
        conversation = start.conversation
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_update(msg: Any) -> None:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                update = _updates.decode(msg.data)
                if (
                    isinstance(update, ConversationEnded)
                    and update.status == "refused"
                    and not refused.done()
                ):
                    refused.set_result(update.reason or "refused")

        sub = await self._bus.nc.subscribe(subjects.conversation_updates(client, conversation), cb=on_update)
        try:
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
            deadline, pause = time.monotonic() + self._settings.request_timeout_s, 0.002
            while time.monotonic() < deadline:
                view = await self._ask(ConversationQuery(conversation=conversation), ConversationView)
                if view.found:
                    return True
                await asyncio.wait({refused}, timeout=pause)
                if refused.done():
                    raise ApiProblem(422, f"the conversation was refused: {refused.result()}")
                # A start is recorded within milliseconds unless the supervisor is behind:
                # ask often at first, and at most every 20 ms.
                pause = min(pause * 1.5, 0.02)
            return False
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

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
            | {"transcript": [{k: t[k] for k in ("role", "text", "agent")} for t in data["transcript"]]}
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

    async def _stored(self, publishing: Awaitable[_T]) -> _T:
        """What the shared client (``core._client``) publishing returns, once stored; 503 if
        it could not be."""
        try:
            return await publishing
        except BusError as exc:
            raise ApiProblem(
                503, f"the message could not be stored ({exc}); send it again", headers=_RETRY
            ) from exc

    # --- operator endpoints ---------------------------------------------------------

    async def _to_desk(self, message: OperatorRequest | ApprovalVerdict, *, missing: str) -> OperatorAnswer:
        """The operators' desk's answer; a refusal as a problem (404 when what it names does
        not exist, whose reason starts with ``missing``; 409 otherwise)."""
        answer = await self._request(subjects.operator_requests(), message, OperatorAnswer)
        if answer.status != "ok":
            raise ApiProblem(404 if answer.reason.startswith(missing) else 409, answer.reason)
        return answer

    async def queue(self, request: Request) -> Response:
        await self._key(request, operator=True)
        view = await self._ask(QueueQuery(limit=100), QueueView)
        return JSONResponse(m.Queue.model_validate({"items": view.items}).model_dump())

    def _operator_action(self, action: OperatorAction) -> Callable[[Request], Awaitable[Response]]:
        async def act(request: Request) -> Response:
            key = await self._key(request, operator=True)
            conversation = request.path_params["conversation"]
            body = await self._body(request, m.OperatorActionRequest)
            if not subjects.is_id(conversation):
                raise ApiProblem(404, f"no conversation {conversation!r}")
            asked = OperatorRequest(
                action=action,
                conversation=conversation,
                by=key.client,
                id=f"o-{uuid.uuid4().hex[:20]}",
                text=body.text,
                agent=body.agent,
                note=body.note,
            )
            answer = await self._to_desk(asked, missing="no conversation")
            done = m.OperatorActionDone(
                conversation=conversation,
                action=action,
                claimed_by=answer.claimed_by or None,
                claim_expires_at=answer.claim_expires_at or None,
            )
            return JSONResponse(done.model_dump())

        return act

    async def approvals(self, request: Request) -> Response:
        await self._key(request, operator=True)
        view = await self._ask(ApprovalsQuery(), ApprovalsView)
        return JSONResponse(m.Approvals.model_validate({"items": view.items}).model_dump(mode="json"))

    def _verdict(self, approve: bool) -> Callable[[Request], Awaitable[Response]]:
        async def decide(request: Request) -> Response:
            key = await self._key(request, operator=True)
            approval = request.path_params["approval"]
            body = await self._body(request, m.VerdictRequest)
            if not subjects.is_id(approval):
                raise ApiProblem(404, f"no approval {approval!r}")
            verdict = ApprovalVerdict(
                approval_id=approval, approve=approve, by=key.client, reason=body.reason
            )
            await self._to_desk(verdict, missing="no approval")
            done = m.VerdictDone(approval=approval, status="approved" if approve else "denied")
            return JSONResponse(done.model_dump())

        return decide

    # --- the app --------------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint, for the routes and for the OpenAPI document: the clients', then
        the operators'."""
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
        return [*endpoints, *self._operator_endpoints()]

    def _operator_endpoints(self) -> list[Endpoint]:
        """The queue and the approvals: an operator's key only."""
        queue = "/v1/queue/{conversation}"
        endpoints = [
            Endpoint("GET", "/v1/queue", self.queue, "The human queue", None, m.Queue, 200, operator=True),
        ]
        endpoints.append(
            Endpoint(
                "GET",
                "/v1/approvals",
                self.approvals,
                "Pending approvals",
                None,
                m.Approvals,
                200,
                operator=True,
            )
        )
        for verb, approve in (("approve", True), ("deny", False)):
            endpoints.append(
                Endpoint(
                    "POST",
                    f"/v1/approvals/{{approval}}/{verb}",
                    self._verdict(approve),
                    f"{verb.capitalize()} a pending approval",
                    m.VerdictRequest,
                    m.VerdictDone,
                    200,
                    operator=True,
                )
            )
        for action, summary in (
            ("claim", "Claim an escalated conversation"),
            ("reply", "Answer its customer as a human"),
            ("handback", "Hand it back to an agent"),
            ("close", "Close it"),
        ):
            endpoints.append(
                Endpoint(
                    "POST",
                    f"{queue}/{action}",
                    self._operator_action(action),  # type: ignore[arg-type]
                    summary,
                    m.OperatorActionRequest,
                    m.OperatorActionDone,
                    200,
                    operator=True,
                )
            )
        return endpoints

    def app(self) -> Starlette:
        endpoints = self.endpoints()
        document = openapi(endpoints)

        async def spec(request: Request) -> Response:
            return JSONResponse(document)

        routes = [Route(e.path, e.handler, methods=[e.method]) for e in endpoints]
        routes.append(Route("/openapi.json", spec, methods=["GET"]))
        return Starlette(
            routes=routes,
            exception_handlers={ApiProblem: on_problem, HTTPException: on_http_error},
        )

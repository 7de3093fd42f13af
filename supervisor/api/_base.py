"""What every endpoint of the API stands on: its settings, the keys it checks, the bodies it
reads, and how it asks the supervisor."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from corral.bus import (
    ApiRequest,
    Bus,
    BusError,
    ConversationQuery,
    ConversationView,
    KeyCheck,
    KeyInfo,
    Limits,
    OperatorAnswer,
    OperatorInput,
    request,
    subjects,
)
from corral.supervisor.api._keys import digest, looks_like_key
from corral.supervisor.api._problems import ApiProblem

_M = TypeVar("_M", bound=BaseModel)
_A = TypeVar("_A", bound=msgspec.Struct)
_T = TypeVar("_T")
_RETRY = {"Retry-After": "1"}

KEY_CACHE_S = 10.0
"""How long a checked key is believed without asking again (a revoked key stops within it)."""


@dataclass(frozen=True, kw_only=True)
class ConsoleInfo:
    """What the console draws from the config: the team and its graph."""

    entry: str = ""
    edges: dict[str, list[str]] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    """What the API is configured with (``api:`` in corral.yaml, and ``limits:``)."""

    limits: Limits
    rate_per_s: float = 20.0
    burst: int = 40
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0
    console: ConsoleInfo = field(default_factory=ConsoleInfo)


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


class ApiBase:
    """The endpoints' plumbing over one bus connection (the API's identity)."""

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

    async def _stored(self, publishing: Awaitable[_T]) -> _T:
        """What the shared client (``core._client``) publishing returns, once stored; 503 if
        it could not be."""
        try:
            return await publishing
        except BusError as exc:
            raise ApiProblem(
                503, f"the message could not be stored ({exc}); send it again", headers=_RETRY
            ) from exc

    async def _to_desk(self, message: OperatorInput, *, missing: str) -> OperatorAnswer:
        """The operators' desk's answer; a refusal as a problem (404 when what it names does
        not exist, whose reason starts with ``missing``; 409 otherwise)."""
        answer = await self._request(subjects.operator_requests(), message, OperatorAnswer)
        if answer.status != "ok":
            raise ApiProblem(404 if answer.reason.startswith(missing) else 409, answer.reason)
        return answer

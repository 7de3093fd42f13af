"""RFC 9457 problem details: every error the API answers, as ``application/problem+json``."""

from __future__ import annotations

from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MEDIA_TYPE = "application/problem+json"


class ApiProblem(Exception):
    """Raised by a handler: answered as a problem with ``status`` and ``detail``."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """A problem-details response."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    return problem(exc.status, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own (a route that does not exist, a method it does not take)."""
    status = getattr(exc, "status_code", 400)
    detail = getattr(exc, "detail", "") or HTTPStatus(status).phrase
    return problem(status, str(detail), getattr(exc, "headers", None))

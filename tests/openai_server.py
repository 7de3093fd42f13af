"""A small OpenAI-compatible chat-completions server that answers by script, for tests
that drive litellm's real ``openai`` provider over HTTP.

Each model name (what the request's ``model`` says, e.g. ``primary`` for litellm's
``openai/primary``) has a queue of scripted replies: an answer, an HTTP error with an
OpenAI-style body (optionally with ``Retry-After``), and either of them after a delay.
Every request is recorded, with the time it arrived, so tests can assert the order of
attempts and the pauses between them. An empty queue answers 500 ``script exhausted``,
so a test sees a model called more often than it scripted.

Use the ``openai_server`` fixture (``from tests.openai_server import openai_server``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted reply: a 200 answer, or an error status with an OpenAI error body."""

    status: int = 200
    content: str | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    """``(name, arguments)`` pairs, in order; arguments are sent as written."""
    prompt_tokens: int = 10
    completion_tokens: int = 5
    delay_s: float = 0.0
    """Seconds to wait before answering (to exceed a client's timeout)."""
    retry_after: str | None = None
    message: str = ""


def answer(
    content: str | None = None,
    *,
    tool_calls: list[tuple[str, str]] | None = None,
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    delay_s: float = 0.0,
) -> Reply:
    """A 200 answer with ``content`` and/or ``tool_calls``."""
    return Reply(
        content=content,
        tool_calls=list(tool_calls or []),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        delay_s=delay_s,
    )


def error(status: int, message: str = "scripted error", *, retry_after: str | None = None) -> Reply:
    """An HTTP error ``status`` with an OpenAI-style error body."""
    return Reply(status=status, message=message, retry_after=retry_after)


@dataclass(frozen=True, kw_only=True)
class Received:
    """One request the server received."""

    at: float
    """``time.monotonic()`` when it arrived."""
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    response_format: dict[str, Any] | None
    body: dict[str, Any]


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_exceeded"}


class OpenAIServer:
    """The server, on a loopback port of its own, running uvicorn in a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Reply]] = {}
        self._received: list[Received] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        """The OpenAI base URL (``…/v1``) to give litellm as ``api_base``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        """Serve. The socket already listens, so requests made at once wait in its backlog."""
        self._socket.listen(64)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (requests still sleeping in a delay are cut off)."""
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def script(self, model: str, *replies: Reply) -> None:
        """Queue ``replies`` for ``model``, after any still queued."""
        with self._lock:
            self._scripts.setdefault(model, deque()).extend(replies)

    def requests(self, model: str | None = None) -> list[Received]:
        """The requests received so far (for ``model``, or all), in arrival order."""
        with self._lock:
            return [r for r in self._received if model is None or r.model == model]

    async def _chat(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        model = str(body.get("model", ""))
        with self._lock:
            self._received.append(
                Received(
                    at=time.monotonic(),
                    model=model,
                    messages=body.get("messages", []),
                    tools=body.get("tools"),
                    tool_choice=body.get("tool_choice"),
                    response_format=body.get("response_format"),
                    body=body,
                )
            )
            queue = self._scripts.get(model)
            reply = queue.popleft() if queue else error(500, f"script exhausted for model {model!r}")
            number = len(self._received)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return _response(model, reply, number)


def _response(model: str, reply: Reply, number: int) -> JSONResponse:
    if reply.status != 200:
        headers = {"retry-after": reply.retry_after} if reply.retry_after is not None else {}
        kind = _ERROR_TYPES.get(reply.status, "server_error")
        body = {"error": {"message": reply.message, "type": kind, "param": None, "code": kind}}
        return JSONResponse(body, status_code=reply.status, headers=headers)
    calls = [
        {
            "id": f"call_srv_{number}_{i}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        for i, (name, arguments) in enumerate(reply.tool_calls)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if calls:
        message["tool_calls"] = calls
    return JSONResponse(
        {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
        }
    )


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A fresh scripted OpenAI-compatible server on a free loopback port."""
    server = OpenAIServer()
    server.start()
    yield server
    server.stop()

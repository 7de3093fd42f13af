"""An OpenAI-compatible chat-completions server that answers from scripted rules: the
provider of the benchmarks' ``http`` depth.

    python bench/openai_script.py --rules scripted.yaml              # prints its base URL
    python bench/openai_script.py --rules scripted.yaml --delay-s 1  # every answer after 1 s

It answers ``POST /v1/chat/completions`` as corral's ``scripted`` model would answer the
same turn (``corral.router.ScriptedModel`` over the same rules file): the agent is the one
the system prompt names ("You are the <agent> agent"), the latest user or tool message
picks the rule, and the rule's answer goes back as native ``tool_calls`` (``<tool>``,
``transfer_to_<agent>``, ``reply``) with ``finish_reason: "tool_calls"`` and a usage
block, so litellm's real ``openai`` provider reads it over HTTP exactly as it would read
a hosted model's. A turn no rule matches is a 400, as a provider refusing a request.

``GET /stats`` says how many requests it answered, the most it held at once, and how long
the client took between an answer and the same conversation's next request (``Stats``).

It runs as a process of its own so the benchmarks can report its CPU apart from corral's:
it plays the provider, whose cost is not corral's. ``ScriptServer`` starts and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from corral.router import ScriptedModel, ScriptError, load_rules

_AGENT = re.compile(r"You are the (\S+) agent")
_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


def agent_of(messages: list[dict[str, Any]]) -> str:
    """The agent a request comes from, as its system prompt names it ("" if none does)."""
    for message in messages:
        if message.get("role") == "system":
            found = _AGENT.search(str(message.get("content") or ""))
            if found is not None:
                return found.group(1)
    return ""


def completion_body(model: ScriptedModel, body: dict[str, Any], number: int) -> tuple[int, dict[str, Any]]:
    """The status and JSON body answering one chat-completions request ``body``."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    name = str(body.get("model", ""))
    try:
        answer = model.match(agent_of(messages), messages)
    except ScriptError as exc:
        error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}
        return 400, {"error": error}
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in answer.tool_calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
    if calls:
        message["tool_calls"] = calls
    # The scripted provider's own token counts, so the journal holds the same usage.
    prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4
    completion_tokens = answer.size // 4
    return 200, {
        "id": f"chatcmpl-script-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class Stats:
    """What the server has seen: requests answered, the most it held at once (a cap on the
    client's side, a connection pool say, shows as a peak below what was sent), and the
    time the client took between one answer of a conversation and its next request
    (everything corral does between two model calls: the gateway reading the answer, the
    journal, the agent, a tool call or a handoff with its decision, the next agent, the next
    request), in all and by hop (``triage->payments`` is a handoff, ``payments->payments``
    the agent's tool call). A conversation is known by the customer's message, which opens
    every agent's first user message."""

    def __init__(self) -> None:
        self.served = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._answered: dict[str, tuple[str, float]] = {}
        self.gaps_s: dict[str, list[float]] = {}

    def arrived(self, messages: list[dict[str, Any]]) -> str:
        """Count a request in; its conversation's key."""
        self.served += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        # The customer's words open every agent's first user message; notes follow a blank line.
        first = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
        key = first.split("\n\n", 1)[0]
        agent = agent_of(messages)
        answered = self._answered.pop(key, None)
        if answered is not None:
            hop = f"{answered[0]}->{agent}"
            self.gaps_s.setdefault(hop, []).append(time.monotonic() - answered[1])
        return key

    def answered(self, key: str, agent: str) -> None:
        """Count a request out (its answer is about to be sent)."""
        self.in_flight -= 1
        self._answered[key] = (agent, time.monotonic())

    def as_json(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "between_calls_ms": _quantiles_ms([g for gaps in self.gaps_s.values() for g in gaps]),
            "between_calls_ms_by_hop": {
                hop: _quantiles_ms(gaps) for hop, gaps in sorted(self.gaps_s.items())
            },
        }


def _quantiles_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def ms(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else 0.0

    return {"count": len(ordered), "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99)}


def app(model: ScriptedModel, delay_s: float) -> Any:
    """The starlette application: the chat completions, and ``GET /stats`` (``Stats``)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    stats = Stats()

    async def chat(request: Request) -> Response:
        request_body = _decode(await request.body())
        messages = request_body.get("messages") or []
        key = stats.arrived(messages)
        try:
            status, body = completion_body(model, request_body, stats.served)
            if delay_s:
                await asyncio.sleep(delay_s)
        finally:
            stats.answered(key, agent_of(messages))
        return Response(_encode(body), status_code=status, media_type="application/json")

    async def read_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats.as_json())

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/stats", read_stats, methods=["GET"]),
        ]
    )


def serve(rules: Path, delay_s: float, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; print the base URL once the socket listens."""
    import uvicorn

    model = ScriptedModel(load_rules(rules), name="openai-script")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Every conversation in flight may hold a connection: a short backlog would refuse some.
    sock.listen(4096)
    config = uvicorn.Config(
        app(model, delay_s),
        log_level="warning",
        access_log=False,
        lifespan="off",
        loop="uvloop" if _has("uvloop") else "asyncio",
        backlog=4096,
        timeout_keep_alive=60,
        timeout_graceful_shutdown=1,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"http://{bound_host}:{bound_port}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def _has(module: str) -> bool:
    with contextlib.suppress(ImportError):
        __import__(module)
        return True
    return False


class ScriptServer:
    """The server as a child process of the benchmark: ``start()``, ``url``, ``pid``,
    ``stop()``.

    Args:
        rules: The scripted rules file (the one corral's scripted model would read).
        delay_s: Seconds every answer waits before it is sent (a model's thinking time).
        log: Where the server's own output goes.
    """

    def __init__(self, rules: Path, *, delay_s: float = 0.0, log: Path) -> None:
        self._rules = rules.resolve()
        self._delay_s = delay_s
        self._log = log.resolve()
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        """The server's process id (for its CPU and memory)."""
        assert self._process is not None
        return self._process.pid

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the server and wait for its base URL (``http://127.0.0.1:<port>/v1``)."""
        command = [sys.executable, str(Path(__file__).resolve()), "--rules", str(self._rules)]
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [*command, "--delay-s", str(self._delay_s)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
            )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self._first_line()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not lines or not lines[0].startswith("http://"):
            self.stop()
            raise RuntimeError(f"the OpenAI script server did not start: {self._log.read_text()[-2000:]}")
        self.url = lines[0].strip()
        return self.url

    def _first_line(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        return self._process.stdout.readline()

    def stats(self) -> dict[str, Any]:
        """The server's ``Stats`` now (``GET /stats``)."""
        with urllib.request.urlopen(f"{self.url.removesuffix('/v1')}/stats", timeout=10) as response:
            return dict(json.loads(response.read()))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=Path, required=True, help="the scripted rules file")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (the URL is printed)")
    args = parser.parse_args()
    serve(args.rules, args.delay_s, args.host, args.port)


if __name__ == "__main__":
    main()

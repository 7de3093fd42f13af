"""The tool gateway's transport: tool calls served over NATS (``bus.RequestService``: the
sender from the subject, poison dead-lettered, the caller's trace context), each decided by
the engine (``_engine``), answered to the agent, then told to the conversation's client.

Tool bodies run under a deadline (``_tool_runner``; ``_tool_process`` for a tool isolated in
a child process), their statements as the role ``corral_tools`` in the call's transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client

from corral.bus import (
    Requester,
    RequestService,
    ToolCall,
    ToolDecided,
    ToolResult,
    publish_live,
    spans,
    subjects,
)
from corral.supervisor.gateway._config import GatewayConfig
from corral.supervisor.gateway._engine import CallEngine
from corral.supervisor.gateway._policy import PolicyEngine
from corral.supervisor.gateway._tool_process import ProcessTool
from corral.supervisor.gateway._tool_runner import ToolRunner
from corral.supervisor.gateway._tools import Tool

__all__ = ["GatewayConfig", "ToolGateway"]

logger = logging.getLogger(__name__)

_call_decoder = msgspec.json.Decoder(ToolCall)


class ToolGateway(RequestService[ToolCall, ToolResult]):
    """Decide and apply tool calls; serve them over NATS with ``run()``.

    Args:
        nc: A NATS connection (the supervisor's identity).
        pool: PostgreSQL: corral's tables and the tools' backend.
        tools: The tools by name.
        policy: The Cedar policies (bound here to ``tools``).
        config: Approval limits, grants, caps and the tool timeout.
    """

    def __init__(
        self,
        nc: Client | None,
        pool: asyncpg.Pool,
        tools: Iterable[Tool[Any]],
        policy: PolicyEngine,
        config: GatewayConfig | None = None,
    ) -> None:
        super().__init__(nc, subjects.all_agent_tools(), _call_decoder, queue="gateway")  # type: ignore[arg-type]
        self._tools: dict[str, Tool[Any]] = {
            tool.name: ProcessTool(tool) if tool.isolation == "process" else tool for tool in tools
        }
        self._process_tools = [tool for tool in self._tools.values() if isinstance(tool, ProcessTool)]
        self._runner = ToolRunner()
        # Bound to the tools it serves (a no-op for an engine the supervisor loaded with them);
        # not strictly: a gateway may serve some of a team's tools, as tests build them.
        bound = policy.bind(self._tools.values(), strict=False)
        self._engine = CallEngine(pool, self._tools, bound, config or GatewayConfig(), self._runner)

    async def _serve(self) -> None:
        """Serve until ``shutdown()``; then stop the idle tool workers and kill the tool
        processes (``shutdown()`` returns once they are)."""
        try:
            for tool in self._process_tools:
                await tool.start()  # a child ready: the first call's deadline does not pay its start
            await super()._serve()
        finally:
            self._runner.close()
            for tool in self._process_tools:
                await tool.close()

    async def answer(self, request: ToolCall, requester: Requester) -> ToolResult:
        """The decision on one tool call (raises, and so answers nothing, when none was
        reached: the agent asks again with the same key); the conversation's client is told
        once the agent has its answer."""
        sender = requester.sender
        result, client = await self._decide(request, sender)
        requester.after_answer(lambda: self._tell(client, request, sender, result))
        return result

    async def call(self, call: ToolCall, sender: str) -> ToolResult:
        """Decide and (maybe) apply one call from ``sender``; tell the conversation's client."""
        result, client = await self._decide(call, sender)
        await self._tell(client, call, sender, result)
        return result

    async def _decide(self, call: ToolCall, sender: str) -> tuple[ToolResult, str | None]:
        with spans.policy(call, agent=sender) as span:
            result, client = await self._engine.decide(call, sender)
            spans.tool_result(span, result)
        return result, client

    async def _tell(self, client: str | None, call: ToolCall, sender: str, result: ToolResult) -> None:
        if client is None or self._nc is None or result.replayed:
            return
        update = ToolDecided(
            conversation=call.conversation,
            step=call.step,
            agent=sender,
            tool=call.tool,
            status=result.status,
            reason=result.reason,
            policy_ids=result.policy_ids,
            approval_id=result.approval_id,
            result=result.result,
        )
        await publish_live(self._nc, subjects.conversation_progress(client, call.conversation), update)

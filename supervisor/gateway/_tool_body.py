"""A tool call's bodies (``resource()`` and ``run()``) as the gateway runs them: through the
``ToolRunner`` under one deadline, their statements as ``corral_tools`` in the call's
transaction, and what makes one fail (a timeout, a refused statement, an error no retry
mends, a result too big)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import asyncpg
import msgspec

from corral.bus import is_retryable
from corral.supervisor.gateway._policy import PolicyDecision
from corral.supervisor.gateway._tool_runner import ToolRunner, ToolStatementError, ToolTimeoutError
from corral.supervisor.gateway._tools import Tool, ToolInput
from corral.supervisor.store._roles import TOOLS_ROLE
from corral.supervisor.store._store import needs_reset

T = TypeVar("T")

ENTER_TOOLS = f"SET LOCAL ROLE {TOOLS_ROLE}"
LEAVE_TOOLS = "SET LOCAL ROLE NONE"
_json = msgspec.json.Encoder()


class BodyFailed(Exception):
    """A tool body timed out, was refused or raised: the call's transaction is rolled back,
    and the failure recorded for its key in another (``decision`` and ``approval_id`` say
    what had been decided)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.decision: PolicyDecision | None = None
        self.approval_id: str | None = None


class ToolBody:
    """Tool bodies of one call: run by the ``ToolRunner`` under one deadline, their
    statements as the tools' role in the call's transaction.

    Args:
        inside: The call's first statement already entered the tools' role.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        runner: ToolRunner,
        tool: Tool[Any],
        timeout_s: float,
        result_bytes: int,
        *,
        inside: bool,
    ) -> None:
        self._conn = conn
        self._runner = runner
        self._tool = tool
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._timeout_s = timeout_s
        self._result_bytes = result_bytes
        self._inside = inside

    async def run(self, body: Callable[[ToolInput[Any]], Awaitable[T]], ctx: ToolInput[Any]) -> T:
        """``body(ctx)`` as the tools' role.

        Raises:
            BodyFailed: it timed out, was refused, raised what trying again cannot mend
                (``bus.is_retryable``), or returned too much.
            Exception: what it raised that trying again may mend (a backend's hiccup, or a
                duplicate of the call that committed meanwhile): no decision; the agent
                asks again, as often as its task may be delivered.
        """
        if not self._inside:
            await self._conn.execute(ENTER_TOOLS)
            self._inside = True
        needs_reset(self._conn)
        remaining = self._deadline - self._loop.time()
        try:
            result = await self._runner.run(
                self._tool.name, body, ctx, remaining, isolation=self._tool.isolation
            )
        except Exception as exc:
            raise_body_failure(self._tool.name, exc, self._timeout_s)
        check_result_size(self._tool.name, result, self._result_bytes)
        return result

    async def leave(self) -> None:
        """Back to the gateway's own role, for corral's statements (audit, ledger, approvals).

        Raises:
            BodyFailed: the tool swallowed the error of one of its statements.
        """
        if not self._inside:
            return
        try:
            await self._conn.execute(LEAVE_TOOLS)
        except asyncpg.InFailedSQLTransactionError as exc:
            raise BodyFailed(f"tool {self._tool.name} failed: one of its statements failed") from exc
        self._inside = False


def raise_body_failure(tool: str, exc: Exception, timeout_s: float) -> NoReturn:
    """Raise what a body's ``exc`` makes of the call: ``BodyFailed`` (timed out, refused, or
    what no retry mends: ``bus.is_retryable``), or ``exc`` itself (the agent asks again)."""
    if isinstance(exc, ToolTimeoutError):
        raise BodyFailed(f"tool {tool} timed out after {timeout_s:g}s") from exc
    if isinstance(exc, ToolStatementError | asyncpg.InsufficientPrivilegeError):
        raise BodyFailed(f"tool {tool} was refused: {exc}") from exc
    if is_retryable(exc):
        raise exc
    raise BodyFailed(f"tool {tool} raised {type(exc).__name__}: {exc}") from exc


def check_result_size(tool: str, result: object, limit: int) -> None:
    """Raises BodyFailed for a result over ``limit`` bytes: its answer could not reach the
    agent, so what the tool did must not stand either."""
    if isinstance(result, dict) and (size := len(_json.encode(result))) > limit:
        raise BodyFailed(
            f"tool {tool} returned {size} bytes, over limits.tool_result_bytes ({limit});"
            " nothing it did was kept"
        )

"""The gateway's decision engine: one tool call decided, recorded and applied, exactly once.

For one ``ToolCall`` from agent ``A`` (identity from the subject, never the body), in order:

- **shape** (no database): the body's agent is the sender, the tool exists, the arguments
  are valid and not too big (the model answer that asked for the call was journaled by the
  model gateway before the agent saw it);
- **the call's first statement**, in one transaction: the call's locks are taken (its
  idempotency key, and the customer for a tool that changes state); the ledger's entry
  for the key, the loop-breaker count and the agent's kill row
  (``FOR SHARE``: a kill waits for the calls in flight) are read; when nothing can refuse
  the call before policy, the tools' role is entered for the body;
- **limits**: a killed agent, a conversation not running or not at ``A``'s turn, a key the
  ledger already decided (answered with the first decision: every decision is final for its
  key, only a call waiting for approval is decided again), a tool not granted, a call index
  past the per-step cap, invalid arguments, a spent budget or a loop;
- **authorize**: in the tool's worker, in one hop, the tool names the resource and its
  facts, Cedar decides allow, deny or approval, and an allowed call's effect runs; a call
  that needs approval consumes a granted approval of this exact action or files one;
- **apply**: the effect, the ledger entry and the audit record commit together.

A body that times out, is refused or raises what no retry mends rolls the whole
transaction back; a second one records the failure for the key and the call is answered
``error``. Dry-run conversations run read-only tools for real and stop every other call
after the decision: the result says what would have happened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from corral.bus import ToolCall, ToolResult, ToolStatus
from corral.supervisor.audit._audit import append_audit, digest_arguments
from corral.supervisor.errors import StoreError
from corral.supervisor.gateway._approvals import ApprovalAsk, ApprovalDenied, consume_or_file, keep_used
from corral.supervisor.gateway._binding import bind_customer
from corral.supervisor.gateway._config import GatewayConfig
from corral.supervisor.gateway._effect import run_effect
from corral.supervisor.gateway._policy import PolicyDecision, PolicyEngine
from corral.supervisor.gateway._records import CallRecord, answer, audit_entry, replay
from corral.supervisor.gateway._shape import (
    Shaped,
    authorize,
    missing_customer,
    not_callable,
    shape,
    tool_input,
)
from corral.supervisor.gateway._sql_tools import SqlTool, json_object
from corral.supervisor.gateway._statements import (
    call_expressions,
    call_values,
    facts_placeholders,
)
from corral.supervisor.gateway._tool_body import BodyFailed, ToolBody
from corral.supervisor.gateway._tool_runner import ToolRunner
from corral.supervisor.gateway._tools import Tool, ToolInput
from corral.supervisor.store._budgets import exceeded, repeated_call
from corral.supervisor.store._journal import journal_response
from corral.supervisor.store._tool_statements import installed_functions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Open:
    """A call inside its transaction, past the turn and ledger checks."""

    conn: asyncpg.Connection
    shaped: Shaped
    record: CallRecord
    ctx: ToolInput[Any]
    body: ToolBody
    dry_run: bool
    repeats: int
    facts: dict[str, Any] | None
    """A ``SqlTool``'s facts, read by the call's first statement (None: not read there; its
    bodies run as the tools' role instead)."""

    @property
    def call(self) -> ToolCall:
        return self.shaped.call


class CallEngine:
    """Decide and apply tool calls against PostgreSQL (corral's tables and the tools' backend).

    Args:
        pool: PostgreSQL.
        tools: The tools by name.
        policy: The Cedar policies.
        config: Approval limits, grants, caps, budgets, limits and the tool timeout.
        runner: Runs tool bodies off the event loop, under their deadline.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        tools: Mapping[str, Tool[Any]],
        policy: PolicyEngine,
        config: GatewayConfig,
        runner: ToolRunner,
    ) -> None:
        self._pool = pool
        self._tools = tools
        self._policy = policy
        self._config = config
        self._runner = runner
        self._installed: set[str] | None = None
        """The declared statements' functions in the database, read at the first call."""
        self._declared_tools: dict[str, SqlTool[Any] | None] = {}

    async def decide(self, call: ToolCall, sender: str) -> tuple[ToolResult, str | None]:
        """The answer to ``sender``'s ``call``, and the conversation's client to tell (None:
        no one). Raises what no decision came of (the agent asks again with the same key)."""
        if self._installed is None:
            self._installed = await installed_functions(self._pool)
        failed: BodyFailed | None = None
        raced = False
        while True:
            try:
                return await self._attempt(call, sender, failed)
            except BodyFailed as exc:
                if failed is not None:
                    raise  # cannot happen: recording a failure runs no body
                # Everything the body did rolled back with the call's transaction; the next
                # one records the failure for the key.
                failed = exc
            except (StoreError, asyncpg.UniqueViolationError) as exc:
                if raced or (isinstance(exc, StoreError) and not exc.retryable):
                    raise
                # A call with the same key committed while this one waited for its lock (the
                # ledger's key, or the tool's own, refused the second effect and everything
                # rolled back): this time the ledger answers.
                logger.info("tool call %s raced a duplicate (%s); answering from the ledger", call.tool, exc)
                raced = True

    async def _attempt(
        self, call: ToolCall, sender: str, failed: BodyFailed | None
    ) -> tuple[ToolResult, str | None]:
        """One try at ``call``; ``failed``: the failure of a body in the try before, which
        this one records instead of running anything."""
        shaped = shape(call, sender, self._tools, self._config)
        if not isinstance(shaped, Shaped):
            status, reason = shaped
            return await self._refuse(None, call, sender, "", status, reason), None
        may_run = shaped.refusal is None and failed is None and not self._config.budgets.limits(sender)
        async with self._pool.acquire() as conn, conn.transaction():
            conversation = await self._first_statement(conn, shaped, may_run, self._declared(shaped.tool))
            body = ToolBody(
                conn,
                self._runner,
                shaped.tool,
                self._config.call_timeout_s,
                self._config.limits.tool_result_bytes,
                inside=conversation is not None and conversation["tools_role"] is not None,
            )
            return await self._limits(conn, shaped, conversation, body, failed)

    def _declared(self, tool: Tool[Any]) -> SqlTool[Any] | None:
        """``tool``, if its statements are installed to run inside the gateway's own (worked
        out once per tool, after the first call read what is installed)."""
        if self._installed is None:
            return None
        if tool.name not in self._declared_tools:
            declared: SqlTool[Any] | None = None
            if isinstance(tool, SqlTool) and tool.runs_as_declared():
                functions = (tool.function("facts") if tool.facts_sql else "", tool.function("effect"))
                if all(f is not None and (f == "" or f in self._installed) for f in functions):
                    declared = tool
            self._declared_tools[tool.name] = declared
        return self._declared_tools[tool.name]

    async def _first_statement(
        self, conn: asyncpg.Connection, shaped: Shaped, may_run: bool, declared: SqlTool[Any] | None
    ) -> asyncpg.Record | None:
        """The conversation, in the statement that takes the call's locks: one call per key
        at a time, and for a call that changes state one per customer, so facts like
        "refunds today" cannot change between the decision and the
        effect. (Always key, then customer, then the audit chain's lock at the end: no two
        calls wait on each other in reverse.) It reads the ledger on a snapshot taken before
        the locks: a duplicate that commits meanwhile makes this call's ledger entry collide,
        and ``decide`` answers from the ledger. It reads the agent's kill row FOR SHARE,
        which re-reads it if a kill is committing: no call runs after one. When nothing
        refuses the call, it enters the tools' role for the body, or for a tool that declares
        its statements (``declared``) reads the facts."""
        call, tool = shaped.call, shaped.tool
        facts_call: str | None = None
        facts_values: dict[str, object] = {}
        if declared is not None and declared.facts_sql is not None and shaped.arguments is not None:
            placeholders, facts_values = facts_placeholders(declared.facts_parameters, shaped.arguments)
            facts_call = declared.call_sql("facts", placeholders)
        values = call_values(
            shaped.key,
            tool.changes_state,
            tool.name,
            shaped.checked.resource_key,
            shaped.sender,
            may_run,
            call.step,
            declared is not None,
        )
        return await journal_response(
            conn,
            call.conversation,
            None,
            shaped.sender,
            also=call_expressions(facts_call),
            also_values={**values, **facts_values},
        )

    async def _limits(
        self,
        conn: asyncpg.Connection,
        shaped: Shaped,
        conversation: asyncpg.Record | None,
        body: ToolBody,
        failed: BodyFailed | None,
    ) -> tuple[ToolResult, str | None]:
        """Refuse, replay or record a failure; else decide and apply the call."""
        call, sender = shaped.call, shaped.sender
        customer = conversation["customer"] if conversation else ""
        turn = not_callable(conversation, sender, call.step)
        if conversation is None or turn is not None:
            await body.leave()  # (never inside: the statement enters only on the turn)
            status, reason = turn or ("denied", "the conversation is not running")
            return await self._refuse(conn, call, sender, customer, status, reason), None
        client: str = conversation["client"]
        if conversation["ledger"] is not None:
            await body.leave()
            return replay(call, json.loads(conversation["ledger"])), client
        # From here on the call is the key's owner's: every decision is recorded for the key.
        record = CallRecord(shaped.key, shaped.tool, shaped.checked)
        if shaped.refusal is not None:
            await body.leave()
            status, reason = shaped.refusal
            ledger = record.ledger(call, status, {}, reason)
            return await self._refuse(conn, call, sender, customer, status, reason, ledger), client
        if failed is not None:
            await body.leave()
            return await self._failed(conn, call, customer, record, failed), client
        ctx = tool_input(shaped, conn, customer)
        facts = conversation.get("facts")
        opened = _Open(
            conn,
            shaped,
            record,
            ctx,
            body,
            bool(conversation["dry_run"]),
            conversation["repeats"],
            json_object(facts, shaped.tool.name, "facts") if facts is not None else None,
        )
        return await self._authorize(opened), client

    async def _authorize(self, opened: _Open) -> ToolResult:
        """Budgets and the loop breaker, then (in the tool's worker, in one hop) the
        resource, Cedar's decision and, for an allowed call, the effect."""
        call, tool, budgets = opened.call, opened.shaped.tool, self._config.budgets
        stop = await exceeded(opened.conn, budgets, call.conversation, call.agent) or repeated_call(
            budgets, tool.name, opened.repeats
        )
        if stop is not None:
            await opened.body.leave()
            entry = audit_entry(
                call, call.agent, opened.ctx.customer, opened.record.arguments.digest, "stop", "stopped", stop
            )
            await append_audit(opened.conn, entry, along=opened.record.ledger(call, "stopped", {}, stop))
            return answer(call, "stopped", {}, reason=stop)
        declared = self._declared(tool)
        if declared is not None and (opened.facts is not None or declared.facts_sql is None):
            return await self._declared_call(opened, declared)
        decided: list[PolicyDecision] = []  # written in the worker, read here (also on a timeout)

        async def decide_then_run(tool_ctx: ToolInput[Any]) -> dict[str, Any] | None:
            # A read-only tool runs for real in a dry run too: lookups bind the facts later
            # decisions depend on, so a dry run decides like a real one.
            customer = tool_ctx.customer
            decision = missing_customer(tool, customer) or authorize(
                self._policy, call, tool, await tool.resource(tool_ctx), customer
            )
            decided.append(decision)
            if decision.outcome == "allow" and not (opened.dry_run and tool.changes_state):
                return await tool.run(tool_ctx)
            return None

        try:
            result = await opened.body.run(decide_then_run, opened.ctx)
            await opened.body.leave()
        except BodyFailed as failed:
            failed.decision = decided[0] if decided else None
            raise
        if result is not None:
            return await self._applied(opened, decided[0], None, result)
        return await self._decided(opened, decided[0])

    async def _declared_call(self, opened: _Open, tool: SqlTool[Any]) -> ToolResult:
        """Cedar decides on the facts the first statement read; an allowed call's effect runs
        with its ledger entry and audit record in one statement."""
        call = opened.call
        resource = tool.resource_of(opened.ctx, opened.facts or {})
        customer = opened.ctx.customer
        decision = missing_customer(tool, customer) or authorize(self._policy, call, tool, resource, customer)
        if decision.outcome != "allow" or (opened.dry_run and tool.changes_state):
            return await self._decided(opened, decision)
        try:
            result = await run_effect(
                opened.conn,
                tool,
                call,
                opened.ctx,
                opened.record,
                decision,
                timeout_s=self._config.call_timeout_s,
                result_bytes=self._config.limits.tool_result_bytes,
            )
        except BodyFailed as failed:
            failed.decision = decision
            raise
        if "error" in result:  # nothing was recorded: the backend refused the effect
            return await self._applied(opened, decision, None, result)
        return answer(call, "ok", result, decision=decision)

    async def _decided(self, opened: _Open, decision: PolicyDecision) -> ToolResult:
        """A call that is not simply allowed: denied, simulated, or waiting for approval."""
        approval_id: str | None = None
        if decision.outcome == "deny":
            return await self._conclude(opened, decision, "denied", {}, decision.reason, "denied")
        if decision.outcome == "approval":
            asked = await self._approval(opened, decision)
            if isinstance(asked, ToolResult):
                return asked
            approval_id = asked
        if opened.dry_run:
            would = {"would": f"{opened.shaped.tool.name}({opened.record.arguments.json})"}
            return await self._conclude(
                opened, decision, "simulated", would, decision.reason, "simulated", approval_id
            )
        try:
            result = await opened.body.run(opened.shaped.tool.run, opened.ctx)
            await opened.body.leave()
        except BodyFailed as failed:
            failed.decision, failed.approval_id = decision, approval_id
            raise
        return await self._applied(opened, decision, approval_id, result)

    async def _approval(self, opened: _Open, decision: PolicyDecision) -> ToolResult | str:
        """The approval a call needs: its id once granted (and consumed), else the answer
        (denied, queue full, waiting, or in a dry run what would be asked)."""
        call, tool = opened.call, opened.shaped.tool
        if opened.dry_run:
            # A dry run files no approval request: it only says one would be needed.
            reason = f"would need approval: {decision.reason}"
            would = {"would": f"ask {decision.approver} to approve {tool.name}"}
            return await self._conclude(opened, decision, "simulated", would, reason, "simulated")
        ask = ApprovalAsk(
            conversation=call.conversation,
            customer=opened.ctx.customer,
            agent=call.agent,
            tool=call.tool,
            arguments=opened.record.arguments.json,
            approver=decision.approver or "human",
            policy_ids=decision.policy_ids,
        )
        config = self._config
        try:
            approval_id, granted = await consume_or_file(
                opened.conn, ask, ttl=config.approval_ttl, max_pending=config.max_pending_approvals
            )
        except ApprovalDenied as denied:
            return await self._conclude(
                opened, decision, "denied", {}, str(denied), "denied", denied.approval_id
            )
        if approval_id is None:
            reason = f"{decision.reason}; the approval queue is full (default deny)"
            return await self._conclude(opened, decision, "denied", {}, reason, "denied")
        if not granted:
            # Not final: the key is decided again when the step resumes, so that a granted
            # approval is consumed then.
            return await self._conclude(
                opened,
                decision,
                "approval_required",
                {},
                decision.reason,
                "approval_required",
                approval_id,
                final=False,
            )
        return approval_id

    async def _applied(
        self, opened: _Open, decision: PolicyDecision, approval_id: str | None, result: dict[str, Any]
    ) -> ToolResult:
        """A body that ran: its result, ledger entry and audit record commit with its effect."""
        if "error" in result:
            error = str(result["error"])
            return await self._conclude(
                opened,
                decision,
                "error",
                result,
                error,
                f"failed: {error}",
                approval_id,
                detail=decision.reason,
            )
        if self._config.authenticating:
            await bind_customer(
                opened.conn, opened.call, self._config.authenticating, result, opened.ctx.customer
            )
        return await self._conclude(opened, decision, "ok", result, decision.reason, "applied", approval_id)

    async def _conclude(
        self,
        opened: _Open,
        decision: PolicyDecision,
        status: ToolStatus,
        result: dict[str, Any],
        reason: str,
        outcome: str,
        approval_id: str | None = None,
        *,
        detail: str | None = None,
        final: bool = True,
    ) -> ToolResult:
        """Audit Cedar's ``decision`` and its ``outcome``; a ``final`` one is recorded for the
        key too, in the same statement. ``detail`` (the audit's) defaults to ``reason``."""
        call = opened.call
        entry = audit_entry(
            call,
            call.agent,
            opened.ctx.customer,
            opened.record.arguments.digest,
            decision.outcome,
            outcome,
            reason if detail is None else detail,
            decision.policy_ids,
            approval_id,
        )
        ledger = opened.record.ledger(call, status, result, reason, decision, approval_id) if final else None
        await append_audit(opened.conn, entry, along=ledger)
        return answer(call, status, result, decision=decision, reason=reason, approval_id=approval_id)

    async def _failed(
        self, conn: asyncpg.Connection, call: ToolCall, customer: str, record: CallRecord, failed: BodyFailed
    ) -> ToolResult:
        """A body that timed out, was refused or raised: what it did was rolled back with the
        call's first transaction; in this one the call is answered ``error`` and recorded (a
        retry of the key does not run it again). A granted approval it consumed stays used."""
        decision, approval_id, reason = failed.decision, failed.approval_id, str(failed)
        if approval_id is not None:
            await keep_used(conn, approval_id)
        error = {"error": reason}
        entry = audit_entry(
            call,
            call.agent,
            customer,
            record.arguments.digest,
            decision.outcome if decision else "error",
            f"failed: {reason}",
            reason,
            decision.policy_ids if decision else (),
            approval_id,
        )
        await append_audit(
            conn, entry, along=record.ledger(call, "error", error, reason, decision, approval_id)
        )
        return answer(call, "error", error, decision=decision, reason=reason, approval_id=approval_id)

    async def _refuse(
        self,
        conn: asyncpg.Connection | None,
        call: ToolCall,
        sender: str,
        customer: str,
        status: ToolStatus,
        reason: str,
        ledger: tuple[str, Mapping[str, object]] | None = None,
    ) -> ToolResult:
        """Refuse before any policy is consulted (forgery, wrong turn, a killed agent, a tool
        not granted, bad arguments), audited in the call's transaction ``conn`` if it has
        one, else in a transaction of its own; ``ledger`` records the refusal for the key."""
        logger.warning("tool call %s by %s refused: %s", call.tool, sender, reason)
        detail = reason if call.agent == sender else f"{reason} (body claims {call.agent!r})"
        verdict = {"denied": "deny", "stopped": "stop"}.get(status, status)
        entry = audit_entry(call, sender, customer, digest_arguments(call.arguments), verdict, status, detail)
        if conn is not None:
            await append_audit(conn, entry, along=ledger)
        else:
            async with self._pool.acquire() as own, own.transaction():
                await append_audit(own, entry)
        return answer(call, status, {}, reason=reason)

"""The tool gateway: every tool call is decided, recorded and applied here, exactly once.

For one ``ToolCall`` from agent ``A`` (identity from the subject, never the body):

1. the conversation must be running, at the call's step, with ``A`` holding the turn;
   the acting customer and the dry-run flag come from the conversation;
2. the arguments are validated against the tool's pydantic model;
3. in one transaction, under a lock on the idempotency key:
   a. a killed agent's call is refused (its kill row is read ``FOR SHARE``: a kill waits
      for the calls in flight, and every call after it sees it);
   b. a ledger entry for the key answers a repeated call with the first decision: every
      decision is final for its key, a denial too (only a call waiting for approval is
      decided again, so that a granted approval can be consumed);
   c. the tool must be granted to ``A`` by config, the call's index under the per-step
      cap, the arguments valid, the budgets unspent and the tool not looping on the same
      resource;
   d. the tool names the resource and the facts; Cedar decides allow, deny or approval;
   e. approval: a granted, unexpired, unused approval of this exact action (same hash)
      is consumed and the call proceeds; otherwise a pending approval is filed (or the
      call is denied when the queue is full);
   f. the effect, the ledger entry and the audit record commit together.

Tool bodies run under a deadline (``supervisor.gateway._tool_runner``), their statements as the
role ``corral_tools`` in the call's transaction (the statement that takes the call's locks
also enters the role). A body that times out, is refused or raises makes the whole
transaction roll back; a second one records the failure for the key (the call's locks
taken again, the response journaled again) and the call is answered ``error``.
Dry-run conversations run read-only tools for real and stop every other call after the
decision: the result says what would have happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from corral.bus import (
    DECODE_ERRORS,
    Limits,
    MessageService,
    ToolCall,
    ToolDecided,
    ToolResult,
    ToolStatus,
    encode,
    publish_live,
    subjects,
    traceparent_from,
    use_traceparent,
)
from corral.supervisor.audit._audit import AuditEntry, append_audit, digest_arguments
from corral.supervisor.errors import StoreError
from corral.supervisor.gateway._policy import PolicyDecision, PolicyEngine, PolicyRequest
from corral.supervisor.gateway._tool_body import BodyFailed, ToolBody
from corral.supervisor.gateway._tool_process import ProcessTool
from corral.supervisor.gateway._tool_runner import ToolRunner
from corral.supervisor.gateway._tools import Tool, ToolInput
from corral.supervisor.store._agent_controls import KILLED_SQL
from corral.supervisor.store._budgets import Budgets, exceeded, repeated_call
from corral.supervisor.store._journal import entry_problem, journal_response
from corral.supervisor.store._roles import TOOLS_ROLE

logger = logging.getLogger(__name__)

T = TypeVar("T")

_call_decoder = msgspec.json.Decoder(ToolCall)
_json = msgspec.json.Encoder()
_LOCK_NAMESPACE = 0x746F6F6C  # "tool"
_CUSTOMER_NAMESPACE = 0x63757374  # "cust"
# Evaluated on the conversation's row in the statement that journals the call's response:
# the call's locks ({0} its key; {1} whether the tool changes state), what the ledger has
# for the key, how often the tool ({2}) was called on the same resource ({3}) in the
# conversation, whether the agent ({4}) is killed (locking its row, share), and, when the
# call may run a tool body ({5}: nothing refuses it before policy, no budget reads the
# database) at step {6}, the tools' role entered for the statements that follow (once the
# lock, the kill and the ledger are read: it is the statement's last expression).
_LOCKS_AND_LEDGER = (
    f"pg_advisory_xact_lock({_LOCK_NAMESPACE}, hashtext({{0}})) AS key_lock,"
    f" CASE WHEN {{1}}::boolean THEN pg_advisory_xact_lock({_CUSTOMER_NAMESPACE}, hashtext(owner.customer))"
    " END AS customer_lock,"
    " (SELECT jsonb_build_object('status', l.status, 'result', l.result, 'reason', l.reason,"
    "  'policy_ids', l.policy_ids, 'approval_id', l.approval_id)::text"
    "  FROM tool_ledger l WHERE l.idempotency_key={0}) AS ledger,"
    " (SELECT count(*) FROM tool_ledger l WHERE l.conversation=owner.id AND l.tool={2}"
    "  AND l.resource_key={3}) AS repeats,"
    f" {KILLED_SQL.format('{4}')} AS agent_killed,"
    " CASE WHEN {5}::boolean AND owner.status = 'running' AND owner.current_agent = {4}"
    "  AND owner.step = {6}::integer"
    f"  AND {KILLED_SQL.format('{4}')} IS NULL"
    "  AND NOT EXISTS (SELECT 1 FROM tool_ledger l WHERE l.idempotency_key={0})"
    f" THEN set_config('role', '{TOOLS_ROLE}', true) END AS tools_role"
)
_LEDGER = (
    "INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
    " result, undo, reason, policy_ids, approval_id, resource_key)"
    " VALUES ($1,$2,$3,$4,$5::jsonb,$6,$7::jsonb,$8,$9,$10,$11,$12)"
)


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Limits of the approval queue."""

    approval_ttl: timedelta = timedelta(hours=24)
    """How long a pending or granted approval stays valid (database time)."""
    max_pending_approvals: int = 100
    """Past this, calls that need approval are denied instead of queued."""
    budgets: Budgets = field(default_factory=Budgets)
    """Checked before every call; a call past a budget or in a loop stops the conversation."""
    grants: Mapping[str, Collection[str]] | None = None
    """The tools config grants each agent (``agents.<name>.tools``); any other tool is denied
    before policy. None: every tool is granted (policy alone decides)."""
    max_calls_per_step: Mapping[str, int] = field(default_factory=dict)
    """Per agent (``agents.<name>.max_tool_calls``): a call whose index is past it is refused
    and stops the conversation."""
    default_max_calls_per_step: int = 8
    """The cap for agents ``max_calls_per_step`` does not name."""
    call_timeout_s: float = 10.0
    limits: Limits = field(default_factory=Limits)
    """``tool_arguments_bytes`` and ``tool_result_bytes``: a call's arguments over it are
    invalid; a body whose result is over it is rolled back and the call answered error."""
    """How long a tool body (``resource()`` and ``run()`` together) may take."""


def action_hash(conversation: str, customer: str, agent: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """The identity of one exact action: an approval is bound to it."""
    canonical = json.dumps(
        {
            "conversation": conversation,
            "customer": customer,
            "agent": agent,
            "tool": tool,
            "arguments": arguments,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class _Arguments:
    """A call's validated arguments as JSON, their digest (what the audit records) and the
    resource they name (what the loop breaker counts by, with the tool)."""

    json: dict[str, Any]
    digest: str
    resource_key: str


@dataclass(frozen=True)
class _Record:
    """What the ledger records for a call's key, whatever the decision."""

    key: str
    tool: Tool[Any]
    arguments: _Arguments

    def ledger(
        self,
        call: ToolCall,
        status: ToolStatus,
        result: dict[str, Any],
        reason: str,
        decision: PolicyDecision | None = None,
        approval_id: str | None = None,
    ) -> tuple[str, Sequence[object]]:
        """The ledger's INSERT of this decision (written along with its audit record)."""
        return (
            _LEDGER,
            (
                self.key,
                call.conversation,
                call.agent,
                self.tool.name,
                json.dumps(self.arguments.json),
                status,
                json.dumps(result),
                self.tool.undo,
                reason,
                list(decision.policy_ids) if decision else [],
                approval_id,
                self.arguments.resource_key,
            ),
        )


def _replay(call: ToolCall, recorded: dict[str, Any]) -> ToolResult:
    """The answer the ledger holds for ``call``'s key."""
    return ToolResult(
        conversation=call.conversation,
        step=call.step,
        index=call.index,
        tool=call.tool,
        status=recorded["status"],
        result=recorded["result"],
        reason=recorded["reason"],
        policy_ids=list(recorded["policy_ids"]),
        approval_id=recorded["approval_id"],
        replayed=True,
    )


class _ApprovalDenied(Exception):
    def __init__(self, approval_id: str, message: str) -> None:
        super().__init__(message)
        self.approval_id = approval_id


class ToolGateway(MessageService):
    """Decide and apply tool calls; serve them over NATS with ``run()``.

    Args:
        nc: A NATS connection (the supervisor's identity).
        pool: PostgreSQL: corral's tables and the tools' backend.
        tools: The tools by name.
        policy: The Cedar policies.
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
        super().__init__(nc, subjects.all_agent_tools(), queue="gateway")  # type: ignore[arg-type]
        self._pool = pool
        self._tools: dict[str, Tool[Any]] = {
            tool.name: ProcessTool(tool) if tool.isolation == "process" else tool for tool in tools
        }
        self._process_tools = [tool for tool in self._tools.values() if isinstance(tool, ProcessTool)]
        self._policy = policy
        self._config = config or GatewayConfig()
        self._runner = ToolRunner()

    async def run(self) -> None:
        """Serve until ``shutdown()``; then stop the idle tool workers and kill the tool processes."""
        try:
            for tool in self._process_tools:
                await tool.start()  # a child ready: the first call's deadline does not pay its start
            await super().run()
        finally:
            self._runner.close()
            for tool in self._process_tools:
                await tool.close()

    async def on_message(self, msg: Msg) -> None:
        """Answer one tool request (no answer on failure: the agent retries the same key)."""
        sender = subjects.sender(msg.subject) or ""
        if not subjects.is_agent_inbox(sender, msg.reply):
            logger.warning("tool call from %s ignored: it asks for its answer on %r", sender, msg.reply)
            return
        try:
            call = _call_decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            logger.warning("undecodable tool call from %s: %s", sender, exc)
            return
        with use_traceparent(traceparent_from(msg.headers)):
            try:
                result, client = await self._call(call, sender)
            except Exception:
                logger.exception("tool call %s failed", call.tool)
                return  # no reply: the agent retries with the same key
            await msg.respond(encode(result))  # the agent first, the client's news after
            await self._tell(client, call, sender, result)

    async def call(self, call: ToolCall, sender: str) -> ToolResult:
        """Decide and (maybe) apply one call from ``sender``; tell the conversation's client."""
        result, client = await self._call(call, sender)
        await self._tell(client, call, sender, result)
        return result

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

    async def _call(self, call: ToolCall, sender: str) -> tuple[ToolResult, str | None]:
        failed: BodyFailed | None = None
        raced = False
        while True:
            try:
                return await self._call_once(call, sender, failed)
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

    async def _call_once(
        self, call: ToolCall, sender: str, failed: BodyFailed | None
    ) -> tuple[ToolResult, str | None]:
        """One try at ``call``; ``failed``: the failure of a body in the try before, which
        this one records instead of running anything."""
        if call.agent != sender:
            reason = f"call on {sender}'s subject claims to come from {call.agent!r}"
            return await self._refuse(call, sender, "", "denied", reason), None
        tool = self._tools.get(call.tool)
        if tool is None:
            return await self._refuse(call, sender, "", "denied", f"no tool named {call.tool!r}"), None
        problem = entry_problem(call.response) if call.response is not None else None
        if problem is not None:
            # Never journaled, never counted: spend the budgets would believe.
            return await self._refuse(call, sender, "", "denied", f"response refused: {problem}"), None
        # Journaled under this call's step and index, whatever the body says.
        response = call.response and msgspec.structs.replace(
            call.response, conversation=call.conversation, step=call.step, index=call.index
        )
        arguments: BaseModel | None = None
        limit = self._config.limits.tool_arguments_bytes
        encoded = _json.encode(call.arguments)
        if (size := len(encoded)) > limit:
            invalid = f"invalid arguments: {size} bytes, over limits.tool_arguments_bytes ({limit})"
        elif b"\\u0000" in encoded:  # PostgreSQL stores no NUL: the call could never be recorded
            invalid = "invalid arguments: they contain a NUL character"
        else:
            try:
                arguments, invalid = tool.arguments.model_validate(call.arguments), ""
            except ValidationError as exc:
                invalid = f"invalid arguments: {exc.errors(include_url=False)}"
        dumped = arguments.model_dump(mode="json") if arguments else {}
        checked = _Arguments(
            dumped,
            digest_arguments(dumped) if arguments else "",
            tool.resource_key(dumped) if arguments else "",
        )
        key = f"{call.conversation}:{call.step}:{call.index}"
        refusal = self._before_policy(call, sender, arguments is None, invalid)
        may_run = refusal is None and failed is None and not self._config.budgets.limits(sender)
        async with self._pool.acquire() as conn, conn.transaction():
            # The response that asked for this call commits with the call's outcome (or
            # its refusal), in the statement that reads the conversation. The same
            # statement takes the call's locks: one call per key at a time, and for a call
            # that changes state one per customer, so facts like "refunds today" cannot
            # change between the decision and the effect. (Always key, then customer, then
            # the audit chain's lock at the end: no two calls wait on each other in reverse.)
            # It reads the ledger too, on a snapshot taken before the locks: a duplicate
            # that commits meanwhile makes this call's ledger entry collide, and the
            # retry in ``_call`` answers from the ledger. And it reads the agent's kill row
            # FOR SHARE, which re-reads it if a kill is committing: no call runs after one.
            # When nothing refuses the call, it enters the tools' role for the body.
            conversation = await journal_response(
                conn,
                call.conversation,
                response,
                sender,
                also=_LOCKS_AND_LEDGER,
                also_parameters=(
                    key,
                    tool.changes_state,
                    tool.name,
                    checked.resource_key,
                    sender,
                    may_run,
                    call.step,
                ),
            )
            body = ToolBody(
                conn,
                self._runner,
                tool,
                self._config.call_timeout_s,
                self._config.limits.tool_result_bytes,
                inside=conversation is not None and conversation["tools_role"] is not None,
            )
            customer = conversation["customer"] if conversation else ""
            turn = _not_callable(conversation, sender, call.step)
            if conversation is None or turn is not None:
                await body.leave()  # (never inside: the statement enters only on the turn)
                status, reason = turn or ("denied", "the conversation is not running")
                return await self._refuse(call, sender, customer, status, reason, conn), None
            client: str = conversation["client"]
            if conversation["ledger"] is not None:
                await body.leave()
                return _replay(call, json.loads(conversation["ledger"])), client
            # From here on the call is the key's owner's: every decision is recorded for the key.
            record = _Record(key, tool, checked)
            if refusal is not None:
                await body.leave()
                status, reason = refusal
                along = record.ledger(call, status, {}, reason)
                return await self._refuse(call, sender, customer, status, reason, conn, along), client
            if failed is not None:
                await body.leave()
                return await self._failed(conn, call, customer, record, failed), client
            assert arguments is not None
            ctx = ToolInput(
                arguments=arguments,
                customer=conversation["customer"],
                conversation=call.conversation,
                agent=sender,
                idempotency_key=key,
                conn=conn,
            )
            dry_run, repeats = bool(conversation["dry_run"]), conversation["repeats"]
            result = await self._decide_and_apply(conn, call, tool, ctx, dry_run, record, repeats, body)
            return result, client

    def _before_policy(
        self, call: ToolCall, sender: str, invalid: bool, why_invalid: str
    ) -> tuple[ToolStatus, str] | None:
        """A refusal config and the call's shape decide alone: (status, reason), or None."""
        grants = self._config.grants
        if grants is not None and call.tool not in grants.get(sender, ()):
            return "denied", f"tool {call.tool} is not granted to agent {sender} (agents.{sender}.tools)"
        cap = self._config.max_calls_per_step.get(sender, self._config.default_max_calls_per_step)
        if not 0 <= call.index < cap:
            return "stopped", f"call {call.index} of step {call.step}: at most {cap} tool calls per step"
        if invalid:
            return "invalid", why_invalid
        return None

    async def _decide_and_apply(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        tool: Tool[Any],
        ctx: ToolInput[Any],
        dry_run: bool,
        record: _Record,
        repeats: int,
        body: ToolBody,
    ) -> ToolResult:
        budgets = self._config.budgets
        arguments = record.arguments
        stop = await exceeded(conn, budgets, call.conversation, call.agent) or repeated_call(
            budgets, tool.name, repeats
        )
        if stop is not None:
            await body.leave()
            await append_audit(
                conn,
                _entry(call, call.agent, ctx.customer, arguments.digest, "stop", "stopped", stop),
                along=record.ledger(call, "stopped", {}, stop),
            )
            return self._result(call, "stopped", {}, reason=stop)
        decided: list[PolicyDecision] = []  # written in the worker, read here (also on a timeout)

        async def decide_then_run(tool_ctx: ToolInput[Any]) -> dict[str, Any] | None:
            # In the tool's worker, in one hop: what the call touches, Cedar's decision
            # (thread-safe), and for an allowed call the effect itself. (A read-only tool
            # runs for real in a dry run too: lookups bind the facts later decisions
            # depend on, so a dry run decides like a real one.)
            resource = await tool.resource(tool_ctx)
            decision = self._policy.decide(
                PolicyRequest(
                    principal=call.agent,
                    action=tool.name,
                    resource_type=resource.type,
                    resource_id=resource.id,
                    context={**resource.facts, "irreversible": tool.irreversible},
                )
            )
            decided.append(decision)
            if decision.outcome == "allow" and not (dry_run and tool.changes_state):
                return await tool.run(tool_ctx)
            return None

        try:
            result = await body.run(decide_then_run, ctx)
            await body.leave()
        except BodyFailed as failed:
            failed.decision = decided[0] if decided else None
            raise
        decision = decided[0]
        if result is not None:
            return await self._applied(conn, call, tool, ctx, decision, None, record, result)
        return await self._decided(conn, call, tool, ctx, dry_run, record, decision, body)

    async def _decided(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        tool: Tool[Any],
        ctx: ToolInput[Any],
        dry_run: bool,
        record: _Record,
        decision: PolicyDecision,
        body: ToolBody,
    ) -> ToolResult:
        """A call that is not simply allowed: denied, simulated, or waiting for approval."""
        arguments = record.arguments
        approval_id: str | None = None
        if decision.outcome == "deny":
            await self._audit(
                conn,
                call,
                ctx,
                decision,
                None,
                "denied",
                decision.reason,
                record,
                record.ledger(call, "denied", {}, decision.reason, decision),
            )
            return self._result(call, "denied", {}, decision=decision)
        if decision.outcome == "approval" and dry_run:
            # A dry run files no approval request: it only says one would be needed.
            reason = f"would need approval: {decision.reason}"
            would = {"would": f"ask {decision.approver} to approve {tool.name}"}
            await self._audit(
                conn,
                call,
                ctx,
                decision,
                None,
                "simulated",
                reason,
                record,
                record.ledger(call, "simulated", would, reason, decision),
            )
            return self._result(call, "simulated", would, decision=decision, reason=reason)
        if decision.outcome == "approval":
            try:
                approval_id, granted = await self._approval(conn, call, ctx, decision, arguments.json)
            except _ApprovalDenied as denied:
                reason = str(denied)
                along = record.ledger(call, "denied", {}, reason, decision, denied.approval_id)
                await self._audit(
                    conn, call, ctx, decision, denied.approval_id, "denied", reason, record, along
                )
                return self._result(
                    call, "denied", {}, decision=decision, reason=reason, approval_id=denied.approval_id
                )
            if approval_id is None:
                reason = f"{decision.reason}; the approval queue is full (default deny)"
                await self._audit(
                    conn,
                    call,
                    ctx,
                    decision,
                    None,
                    "denied",
                    reason,
                    record,
                    record.ledger(call, "denied", {}, reason, decision),
                )
                return self._result(call, "denied", {}, decision=decision, reason=reason)
            if not granted:
                # Not final: the key is decided again when the step resumes, so that a
                # granted approval is consumed then.
                await self._audit(
                    conn, call, ctx, decision, approval_id, "approval_required", decision.reason, record
                )
                return self._result(call, "approval_required", {}, decision=decision, approval_id=approval_id)
        if dry_run:
            would = {"would": f"{tool.name}({arguments.json})"}
            await self._audit(
                conn,
                call,
                ctx,
                decision,
                approval_id,
                "simulated",
                decision.reason,
                record,
                record.ledger(call, "simulated", would, decision.reason, decision, approval_id),
            )
            return self._result(call, "simulated", would, decision=decision, approval_id=approval_id)
        try:
            result = await body.run(tool.run, ctx)
            await body.leave()
        except BodyFailed as failed:
            failed.decision, failed.approval_id = decision, approval_id
            raise
        return await self._applied(conn, call, tool, ctx, decision, approval_id, record, result)

    async def _failed(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        customer: str,
        record: _Record,
        failed: BodyFailed,
    ) -> ToolResult:
        """A body that timed out, was refused or raised: what it did was rolled back with the
        call's first transaction; in this one the call is answered ``error`` and recorded (a
        retry of the key does not run it again). A granted approval it consumed stays used."""
        decision, approval_id, reason = failed.decision, failed.approval_id, str(failed)
        if approval_id is not None:
            await conn.execute(
                "UPDATE approvals SET status='used', used_at=now() WHERE id=$1 AND status='approved'",
                approval_id,
            )
        error = {"error": reason}
        entry = _entry(
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
        return self._result(call, "error", error, decision=decision, reason=reason, approval_id=approval_id)

    async def _applied(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        tool: Tool[Any],
        ctx: ToolInput[Any],
        decision: PolicyDecision,
        approval_id: str | None,
        record: _Record,
        result: dict[str, Any],
    ) -> ToolResult:
        """A body that ran: its result, ledger entry and audit record commit with its effect."""
        status: ToolStatus = "error" if "error" in result else "ok"
        reason = str(result["error"]) if status == "error" else decision.reason
        along = record.ledger(call, status, result, reason, decision, approval_id)
        outcome = "applied" if status == "ok" else f"failed: {result['error']}"
        await self._audit(conn, call, ctx, decision, approval_id, outcome, decision.reason, record, along)
        return self._result(
            call,
            status,
            result,
            decision=decision,
            approval_id=approval_id,
            reason=str(result["error"]) if status == "error" else None,
        )

    async def _approval(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        ctx: ToolInput[Any],
        decision: PolicyDecision,
        arguments: dict[str, Any],
    ) -> tuple[str | None, bool]:
        """(approval id, granted). A granted one is consumed: approvals are single-use."""
        digest = action_hash(call.conversation, ctx.customer, call.agent, call.tool, arguments)
        used = await conn.fetchval(
            "UPDATE approvals SET status='used', used_at=now() WHERE id = ("
            " SELECT id FROM approvals WHERE action_hash=$1 AND status='approved' AND expires_at > now()"
            " ORDER BY decided_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            digest,
        )
        if used is not None:
            return used, True
        refused = await conn.fetchrow(
            "SELECT id, decided_by, reason FROM approvals WHERE action_hash=$1 AND status='denied'"
            " ORDER BY decided_at DESC LIMIT 1",
            digest,
        )
        if refused is not None:
            raise _ApprovalDenied(
                refused["id"],
                f"approval {refused['id']} was denied by {refused['decided_by']}: {refused['reason']}",
            )
        pending = await conn.fetchval(
            "SELECT id FROM approvals WHERE action_hash=$1 AND status='pending' AND expires_at > now()",
            digest,
        )
        if pending is not None:
            return pending, False
        queued = await conn.fetchval(
            "SELECT count(*) FROM approvals WHERE status='pending' AND expires_at > now()"
        )
        if queued >= self._config.max_pending_approvals:
            return None, False
        approval_id = f"a-{secrets.token_hex(6)}"
        await conn.execute(
            "INSERT INTO approvals (id, action_hash, conversation, customer, agent, tool, arguments,"
            " approver, policy_ids, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9, now() + $10)",
            approval_id,
            digest,
            call.conversation,
            ctx.customer,
            call.agent,
            call.tool,
            json.dumps(arguments),
            decision.approver or "human",
            list(decision.policy_ids),
            self._config.approval_ttl,
        )
        return approval_id, False

    async def _audit(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        ctx: ToolInput[Any],
        decision: PolicyDecision,
        approval_id: str | None,
        outcome: str,
        detail: str,
        record: _Record,
        along: tuple[str, Sequence[object]] | None = None,
    ) -> None:
        entry = _entry(
            call,
            call.agent,
            ctx.customer,
            record.arguments.digest,
            decision.outcome,
            outcome,
            detail,
            decision.policy_ids,
            approval_id,
        )
        await append_audit(conn, entry, along=along)

    async def _refuse(
        self,
        call: ToolCall,
        sender: str,
        customer: str,
        status: ToolStatus,
        reason: str,
        conn: asyncpg.Connection | None = None,
        along: tuple[str, Sequence[object]] | None = None,
    ) -> ToolResult:
        """Refuse before any policy is consulted (forgery, wrong turn, a killed agent, a tool
        not granted, bad arguments), audited in the call's transaction ``conn`` if it has
        one, else in a transaction of its own; ``along`` records the refusal for the key."""
        logger.warning("tool call %s by %s refused: %s", call.tool, sender, reason)
        detail = reason if call.agent == sender else f"{reason} (body claims {call.agent!r})"
        verdict = {"denied": "deny", "stopped": "stop"}.get(status, status)
        entry = _entry(call, sender, customer, digest_arguments(call.arguments), verdict, status, detail)
        if conn is not None:
            await append_audit(conn, entry, along=along)
        else:
            async with self._pool.acquire() as own, own.transaction():
                await append_audit(own, entry)
        return self._result(call, status, {}, reason=reason)

    @staticmethod
    def _result(
        call: ToolCall,
        status: ToolStatus,
        result: dict[str, Any],
        *,
        decision: PolicyDecision | None = None,
        reason: str | None = None,
        approval_id: str | None = None,
        replayed: bool = False,
    ) -> ToolResult:
        return ToolResult(
            conversation=call.conversation,
            step=call.step,
            index=call.index,
            tool=call.tool,
            status=status,
            result=result,
            reason=reason if reason is not None else (decision.reason if decision else ""),
            policy_ids=list(decision.policy_ids) if decision else [],
            approval_id=approval_id,
            replayed=replayed,
        )


def _not_callable(
    conversation: asyncpg.Record | None, sender: str, step: int
) -> tuple[ToolStatus, str] | None:
    """Why the conversation's state refuses ``sender``'s call at ``step`` (None: it does not):
    the agent is killed, the conversation is not running, or it is not the agent's turn. The
    statement that journals the call enters the tools' role on the same conditions."""
    if conversation is None:
        return "denied", "the conversation is not running"
    if conversation["agent_killed"] is not None:
        return "stopped", f"agent {sender} is killed ({conversation['agent_killed']})"
    if conversation["status"] != "running":
        return "denied", "the conversation is not running"
    if conversation["current_agent"] != sender or conversation["step"] != step:
        return "denied", f"step {step} is not {sender}'s turn"
    return None


def _entry(
    call: ToolCall,
    agent: str,
    customer: str,
    arguments_digest: str,
    decision: str,
    outcome: str,
    detail: str,
    policy_ids: Iterable[str] = (),
    approval_id: str | None = None,
) -> AuditEntry:
    """The audit record of one decision about ``call``, made for ``agent``'s identity."""
    return AuditEntry(
        agent=agent,
        credential_id=f"agent-{agent}",
        on_behalf_of=customer,
        conversation=call.conversation,
        action=call.tool,
        arguments_digest=arguments_digest,
        decision=decision,
        policy_ids=tuple(policy_ids),
        approval_id=approval_id,
        outcome=outcome,
        detail=detail,
    )

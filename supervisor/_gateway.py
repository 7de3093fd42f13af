"""The tool gateway: every tool call is decided, recorded and applied here, exactly once.

For one ``ToolCall`` from agent ``A`` (identity from the subject, never the body):

1. the conversation must be running, at the call's step, with ``A`` holding the turn;
   the acting customer and the dry-run flag come from the conversation;
2. the arguments are validated against the tool's pydantic model;
3. in one transaction, under a lock on the idempotency key:
   a. a ledger entry for the key answers a repeated call with the first result;
   b. the tool names the resource and the facts; Cedar decides allow, deny or approval;
   c. approval: a granted, unexpired, unused approval of this exact action (same hash)
      is consumed and the call proceeds; otherwise a pending approval is filed (or the
      call is denied when the queue is full);
   d. the effect, the ledger entry and the audit record commit together.

Dry-run conversations stop after the decision: the result says what would have happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from agents._tools import Tool, ToolInput
from bus import (
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
from supervisor._audit import AuditEntry, append_audit, digest_arguments
from supervisor._budgets import Budgets, exceeded, repeated_call
from supervisor._journal import journal_response
from supervisor._policy import PolicyDecision, PolicyEngine, PolicyRequest
from supervisor.errors import StoreError

logger = logging.getLogger(__name__)

_call_decoder = msgspec.json.Decoder(ToolCall)
_LOCK_NAMESPACE = 0x746F6F6C  # "tool"
_CUSTOMER_NAMESPACE = 0x63757374  # "cust"
# Evaluated on the conversation's row in the statement that journals the call's response:
# the call's locks ({0} its key; {1} whether the tool changes state), then what the ledger
# has for the key and how often this very call ({2} tool, {3} arguments' digest) was made
# in the conversation.
_LOCKS_AND_LEDGER = (
    f"pg_advisory_xact_lock({_LOCK_NAMESPACE}, hashtext({{0}})) AS key_lock,"
    f" CASE WHEN {{1}}::boolean THEN pg_advisory_xact_lock({_CUSTOMER_NAMESPACE}, hashtext(owner.customer))"
    " END AS customer_lock,"
    " (SELECT l.status FROM tool_ledger l WHERE l.idempotency_key={0}) AS ledger_status,"
    " (SELECT l.result::text FROM tool_ledger l WHERE l.idempotency_key={0}) AS ledger_result,"
    " (SELECT count(*) FROM audit_log a WHERE a.conversation=owner.id AND a.action={2}"
    "  AND a.arguments_digest={3}) AS repeats"
)
_LEDGER = (
    "INSERT INTO tool_ledger (idempotency_key, conversation, agent, tool, arguments, status,"
    " result, undo) VALUES ($1,$2,$3,$4,$5::jsonb,$6,$7::jsonb,$8)"
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
    """A call's validated arguments as JSON, and their digest (what the audit records and
    the loop breaker counts by)."""

    json: dict[str, Any]
    digest: str


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
        config: Approval limits.
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
        self._tools = {tool.name: tool for tool in tools}
        self._policy = policy
        self._config = config or GatewayConfig()

    async def on_message(self, msg: Msg) -> None:
        """Answer one tool request (no answer on failure: the agent retries the same key)."""
        sender = subjects.sender(msg.subject) or ""
        if not subjects.is_agent_inbox(sender, msg.reply):
            logger.warning("tool call from %s ignored: it asks for its answer on %r", sender, msg.reply)
            return
        try:
            call = _call_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
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
        try:
            return await self._call_once(call, sender)
        except (StoreError, asyncpg.UniqueViolationError) as exc:
            if isinstance(exc, StoreError) and not exc.retryable:
                raise
            # A call with the same key committed while this one waited for its lock (the
            # ledger's key, or the tool's own, refused the second effect and everything
            # rolled back): this time the ledger answers.
            logger.info("tool call %s raced a duplicate (%s); answering from the ledger", call.tool, exc)
            return await self._call_once(call, sender)

    async def _call_once(self, call: ToolCall, sender: str) -> tuple[ToolResult, str | None]:
        if call.agent != sender:
            reason = f"call on {sender}'s subject claims to come from {call.agent!r}"
            return await self._refuse(call, sender, "", "denied", reason), None
        tool = self._tools.get(call.tool)
        if tool is None:
            return await self._refuse(call, sender, "", "denied", f"no tool named {call.tool!r}"), None
        # Journaled under this call's step and index, whatever the body says.
        response = call.response and msgspec.structs.replace(
            call.response, conversation=call.conversation, step=call.step, index=call.index
        )
        try:
            arguments: BaseModel | None = tool.arguments.model_validate(call.arguments)
            invalid = ""
        except ValidationError as exc:
            arguments, invalid = None, f"invalid arguments: {exc.errors(include_url=False)}"
        dumped = arguments.model_dump(mode="json") if arguments else {}
        arguments_digest = digest_arguments(dumped) if arguments else ""
        key = f"{call.conversation}:{call.step}:{call.index}"
        async with self._pool.acquire() as conn, conn.transaction():
            # The response that asked for this call commits with the call's outcome (or
            # its refusal), in the statement that reads the conversation. The same
            # statement takes the call's locks: one call per key at a time, and for a call
            # that changes state one per customer, so facts like "refunds today" cannot
            # change between the decision and the effect. (Always key, then customer, then
            # the audit chain's lock at the end: no two calls wait on each other in reverse.)
            # It reads the ledger too, on a snapshot taken before the locks: a duplicate
            # that commits meanwhile makes this call's ledger entry collide, and the
            # retry in ``_call`` answers from the ledger.
            conversation = await journal_response(
                conn,
                call.conversation,
                response,
                sender,
                also=_LOCKS_AND_LEDGER,
                also_parameters=(key, tool.changes_state, tool.name, arguments_digest),
            )
            customer = conversation["customer"] if conversation else ""
            if conversation is None or conversation["status"] != "running":
                return await self._refuse(
                    call, sender, customer, "denied", "the conversation is not running", conn
                ), None
            client: str = conversation["client"]
            if conversation["current_agent"] != sender or conversation["step"] != call.step:
                reason = f"step {call.step} is not {sender}'s turn"
                return await self._refuse(call, sender, customer, "denied", reason, conn), None
            if arguments is None:
                return await self._refuse(call, sender, customer, "invalid", invalid, conn), client
            if conversation["ledger_status"] is not None:
                result = json.loads(conversation["ledger_result"])
                return self._result(call, conversation["ledger_status"], result, replayed=True), client
            ctx = ToolInput(
                arguments=arguments,
                customer=conversation["customer"],
                conversation=call.conversation,
                agent=sender,
                idempotency_key=key,
                conn=conn,
            )
            dry_run, repeats = bool(conversation["dry_run"]), conversation["repeats"]
            result = await self._decide_and_apply(
                conn, call, tool, ctx, dry_run, _Arguments(dumped, arguments_digest), repeats
            )
            return result, client

    async def _decide_and_apply(
        self,
        conn: asyncpg.Connection,
        call: ToolCall,
        tool: Tool[Any],
        ctx: ToolInput[Any],
        dry_run: bool,
        arguments: _Arguments,
        repeats: int,
    ) -> ToolResult:
        budgets = self._config.budgets
        stop = await exceeded(conn, budgets, call.conversation, call.agent) or repeated_call(
            budgets, tool.name, repeats
        )
        if stop is not None:
            await append_audit(
                conn, _entry(call, call.agent, ctx.customer, arguments.digest, "stop", "stopped", stop)
            )
            return self._result(call, "stopped", {}, reason=stop)
        resource = await tool.resource(ctx)
        decision = self._policy.decide(
            PolicyRequest(
                principal=call.agent,
                action=tool.name,
                resource_type=resource.type,
                resource_id=resource.id,
                context={**resource.facts, "irreversible": tool.irreversible},
            )
        )
        approval_id: str | None = None
        if decision.outcome == "deny":
            await self._audit(conn, call, ctx, decision, None, "denied", decision.reason, arguments)
            return self._result(call, "denied", {}, decision=decision)
        if decision.outcome == "approval" and dry_run:
            # A dry run files no approval request: it only says one would be needed.
            reason = f"would need approval: {decision.reason}"
            await self._audit(conn, call, ctx, decision, None, "simulated", reason, arguments)
            return self._result(
                call,
                "simulated",
                {"would": f"ask {decision.approver} to approve {tool.name}"},
                decision=decision,
                reason=reason,
            )
        if decision.outcome == "approval":
            try:
                approval_id, granted = await self._approval(conn, call, ctx, decision, arguments.json)
            except _ApprovalDenied as denied:
                await self._audit(
                    conn, call, ctx, decision, denied.approval_id, "denied", str(denied), arguments
                )
                return self._result(
                    call, "denied", {}, decision=decision, reason=str(denied), approval_id=denied.approval_id
                )
            if approval_id is None:
                reason = f"{decision.reason}; the approval queue is full (default deny)"
                await self._audit(conn, call, ctx, decision, None, "denied", reason, arguments)
                return self._result(call, "denied", {}, decision=decision, reason=reason)
            if not granted:
                await self._audit(
                    conn, call, ctx, decision, approval_id, "approval_required", decision.reason, arguments
                )
                return self._result(call, "approval_required", {}, decision=decision, approval_id=approval_id)
        if dry_run:
            await self._audit(conn, call, ctx, decision, approval_id, "simulated", decision.reason, arguments)
            return self._result(
                call,
                "simulated",
                {"would": f"{tool.name}({arguments.json})"},
                decision=decision,
                approval_id=approval_id,
            )
        result = await tool.run(ctx)
        status: ToolStatus = "error" if "error" in result else "ok"
        ledger = (
            _LEDGER,
            (
                ctx.idempotency_key,
                call.conversation,
                call.agent,
                tool.name,
                json.dumps(arguments.json),
                status,
                json.dumps(result),
                tool.undo,
            ),
        )
        outcome = "applied" if status == "ok" else f"failed: {result['error']}"
        await self._audit(conn, call, ctx, decision, approval_id, outcome, decision.reason, arguments, ledger)
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
        arguments: _Arguments,
        along: tuple[str, Sequence[object]] | None = None,
    ) -> None:
        entry = _entry(
            call,
            call.agent,
            ctx.customer,
            arguments.digest,
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
    ) -> ToolResult:
        """Refuse before any policy is consulted (forgery, wrong turn, bad arguments), audited
        in the call's transaction ``conn`` if it has one, else in a transaction of its own."""
        logger.warning("tool call %s by %s refused: %s", call.tool, sender, reason)
        detail = reason if call.agent == sender else f"{reason} (body claims {call.agent!r})"
        verdict = "deny" if status == "denied" else status
        entry = _entry(call, sender, customer, digest_arguments(call.arguments), verdict, status, detail)
        if conn is not None:
            await append_audit(conn, entry)
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


async def rollback(
    pool: asyncpg.Pool, tools: Mapping[str, Tool[Any]], conversation: str, operator: str
) -> list[dict[str, Any]]:
    """Compensate a conversation's applied tool calls, newest first, each exactly once.

    Each undo runs in its own transaction with its ledger mark and audit record, so an
    interrupted rollback resumes where it stopped. Calls whose tool has no undo are
    reported as irreversible and left alone.

    Returns:
        One entry per applied call: tool, undo, outcome.
    """
    report: list[dict[str, Any]] = []
    rows = await pool.fetch(
        "SELECT idempotency_key, agent, tool, arguments::text AS arguments, result::text AS result"
        " FROM tool_ledger WHERE conversation=$1 AND status='ok' AND rolled_back_at IS NULL"
        " ORDER BY created_at DESC, idempotency_key DESC",
        conversation,
    )
    for row in rows:
        tool = tools[row["tool"]]
        if not tool.changes_state:
            continue
        if tool.undo is None:
            report.append({"tool": tool.name, "undo": None, "outcome": "irreversible: left as is"})
            continue
        undo = tools[tool.undo]
        arguments = undo.arguments.model_validate(
            tool.undo_arguments(json.loads(row["arguments"]), json.loads(row["result"]))
        )
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT 1 FROM tool_ledger WHERE idempotency_key=$1 AND rolled_back_at IS NULL FOR UPDATE",
                row["idempotency_key"],
            )
            if locked is None:
                continue  # another rollback got here first
            customer = await conn.fetchval("SELECT customer FROM conversations WHERE id=$1", conversation)
            ctx = ToolInput(
                arguments=arguments,
                customer=customer,
                conversation=conversation,
                agent=row["agent"],
                idempotency_key=f"{row['idempotency_key']}:undo",
                conn=conn,
            )
            result = await undo.run(ctx)
            await conn.execute(
                "UPDATE tool_ledger SET rolled_back_at=now() WHERE idempotency_key=$1", row["idempotency_key"]
            )
            dumped = arguments.model_dump(mode="json")
            await append_audit(
                conn,
                AuditEntry(
                    agent=operator,
                    credential_id="admin",
                    on_behalf_of=customer,
                    conversation=conversation,
                    action=undo.name,
                    arguments_digest=digest_arguments(dumped),
                    decision="rollback",
                    outcome="applied" if "error" not in result else f"failed: {result['error']}",
                    detail=f"compensates {tool.name} {row['idempotency_key']}",
                ),
            )
        report.append({"tool": tool.name, "undo": undo.name, "outcome": result})
    return report

"""`corral show CONV`, `corral conversations`: what happened to a conversation, read from
the database (its decisions, every tool call's outcome, its approvals, its reply)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    ConversationArgument,
    JsonOption,
    UnknownIdError,
    _database,
    _load,
    _run,
    app,
    complain,
    print_json,
    print_table,
    say,
)

if TYPE_CHECKING:
    from corral.supervisor.store._reports import ConversationReport, ModelCallRecord, ToolOutcome


@app.command()
def show(
    conversation: ConversationArgument,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a conversation: its status, path (with each handoff's confidence), the
    supervisor's decisions, every tool call's outcome (failures too), its approvals, and
    the reply or the reason. An unknown id exits 2."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        from corral.supervisor.store._reports import conversation_report

        conn = await _database(settings)
        try:
            report = await conversation_report(conn, conversation)
        finally:
            await conn.close()
        if report is None:
            raise UnknownIdError(f"no conversation {conversation!r}: `corral conversations` lists them")
        if as_json:
            print_json(_document(report))
        else:
            _print_report(report)
        return 0

    _run(_main())


@app.command()
def conversations(
    config: ConfigOption = None,
    status: Annotated[
        str | None,
        typer.Option(help="Only these: running, waiting, replied, refused, escalated, failed, killed"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many")] = 20,
    as_json: JsonOption = False,
) -> None:
    """List conversations, newest first: id, status, when it started, customer, path."""
    from typing import get_args

    from corral.bus import ConversationStatus

    known = get_args(ConversationStatus)
    if status is not None and status not in known:
        complain(f"--status {status!r}: expected one of {', '.join(known)}")
        raise typer.Exit(EXIT_CONFIG)
    settings = _load(config, tools=False)

    async def _main() -> int:
        from corral.supervisor.store._reports import recent_conversations

        conn = await _database(settings)
        try:
            found = await recent_conversations(conn, status=status, limit=limit)
        finally:
            await conn.close()
        if as_json:
            print_json([{**c.__dict__, "path": c.path} for c in found])
        elif not found:
            say("no conversations" + (f" with status {status}" if status else ""))
        else:
            print_table(
                ["conversation", "status", "started", "customer", "path", "cost"],
                [
                    [
                        c.id,
                        c.status,
                        f"{c.created_at:%Y-%m-%d %H:%M:%S}",
                        c.customer or "-",
                        " -> ".join(c.path),
                        f"${c.cost_usd:.4f}",
                    ]
                    for c in found
                ],
                title="conversations, newest first",
            )
        return 0

    _run(_main())


def _print_report(report: ConversationReport) -> None:
    record = report.record
    say(f"conversation {record.id}" + ("  (dry run)" if record.dry_run else ""))
    say(
        f"  status:    {record.status}"
        + (f" (approval {record.approval_id})" if record.status == "waiting" else "")
    )
    say(f"  customer:  {record.customer or '-'}")
    say(f"  started:   {report.created_at:%Y-%m-%d %H:%M:%S %Z} (last change {report.updated_at:%H:%M:%S})")
    say(f"  message:   {record.text}")
    if len(record.turns) > 1:
        say("  turns:")
        for turn in record.turns:
            if turn.role == "tool":
                first = turn.text.partition("\n")[0]
                say(f"    {turn.agent} called {turn.tool} {turn.arguments}: {first}")
                continue
            who = {"customer": "customer", "agent": turn.agent, "human": f"operator {turn.agent}"}[turn.role]
            say(f"    {who}: {turn.text}")
    say(f"  path:      {_path(report)}")
    say("  decisions:")
    for step in report.steps:
        line = f"    {step.agent} {step.kind}"
        if step.target:
            line += f" -> {step.target}"
        if step.confidence is not None:
            line += f" ({step.confidence:.2f})"
        say(line + (f": {step.detail}" if step.detail else ""))
    if report.tools:
        say("  tools:")
        for tool in report.tools:
            say(f"    {_tool_line(tool)}")
            say(f"      arguments: {json.dumps(tool.arguments, sort_keys=True)}")
            if tool.status == "ok":
                say(f"      result:    {json.dumps(tool.result, sort_keys=True)}")
    if report.approvals:
        say("  approvals:")
        for a in report.approvals:
            state = "expired" if a.expired and a.status == "pending" else a.status
            who = f" by {a.decided_by}" if a.decided_by else f" (asks {a.approver})"
            why = f": {a.reason}" if a.reason else ""
            arguments = json.dumps(a.arguments, sort_keys=True)
            say(f"    {a.id}  {a.agent} {a.tool} {arguments} -> {state}{who}{why}")
    for dropped in report.dropped:
        say(f"  dropped:   {dropped}")
    if report.model_calls:
        say("  model calls:")
        for call in report.model_calls:
            say(f"    {_model_line(call)}")
    spend = report.spend
    say(f"  spend:     {spend.model_calls} model calls, {spend.tokens} tokens, ${spend.cost_usd:.6f}")
    if record.reply:
        say(f"  reply:     {record.reply}")
    if record.reason:
        say(f"  reason:    {record.reason}")


def _path(report: ConversationReport) -> str:
    from corral.supervisor.core._client import format_hops

    return format_hops(report.record.path)


def _model_line(call: ModelCallRecord) -> str:
    """``step 1 #0 triage fast scripted/support: transfer_to_payments (0.93), 120+30 tokens, $0.000000``."""
    called = ", ".join(call.calls) or "no tool call"
    confidence = f" ({call.confidence:.2f})" if call.confidence is not None else ""
    tried = f", {call.attempts} attempts" if call.attempts > 1 else ""
    return (
        f"step {call.step} #{call.index} {call.agent} {call.tier} {call.model}: {called}{confidence}, "
        f"{call.input_tokens}+{call.output_tokens} tokens, ${call.cost_usd:.6f}{tried}"
    )


def _tool_line(tool: ToolOutcome) -> str:
    """``payments refund -> error: refund exceeds the order's remaining 0 cents [P-45]``."""
    line = f"{tool.agent} {tool.tool} -> {tool.status}"
    if tool.reason and tool.status != "ok":
        line += f": {tool.reason}"
    if tool.policy_ids:
        line += f" [{', '.join(tool.policy_ids)}]"
    if tool.approval_id:
        line += f" (approval {tool.approval_id})"
    if tool.rolled_back:
        line += " (rolled back)"
    return line


def _document(report: ConversationReport) -> dict[str, Any]:
    record = report.record
    return {
        "conversation": record.id,
        "status": record.status,
        "customer": record.customer,
        "text": record.text,
        "dry_run": record.dry_run,
        "created_at": report.created_at.isoformat(),
        "updated_at": report.updated_at.isoformat(),
        "path": [{"agent": h.agent, "confidence": h.confidence, "reason": h.reason} for h in record.path],
        "turns": [{"role": t.role, "agent": t.agent, "text": t.text} for t in record.turns],
        "decisions": [s.__dict__ for s in report.steps],
        "tools": [{**t.__dict__, "at": t.at.isoformat()} for t in report.tools],
        "approvals": [a.__dict__ for a in report.approvals],
        "dropped": report.dropped,
        "spend": report.spend.__dict__,
        "model_calls": [m.__dict__ for m in report.model_calls],
        "approval_id": record.approval_id,
        "reply": record.reply,
        "reason": record.reason,
    }

"""`corral send`, `status`: talking to a running team, and what it prints."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.supervisor.cli._shared import (
    EXIT_NOT_REPLIED,
    EXIT_NOT_RUNNING,
    EXIT_TIMEOUT,
    EXIT_WAITING,
    ConfigOption,
    JsonOption,
    _connect,
    _load,
    _nats_url,
    _run,
    app,
    complain,
    print_json,
    say,
)

if TYPE_CHECKING:
    from corral.bus import ClientUpdate, ConversationEnded, ToolDecided
    from corral.supervisor.core._client import Settled
    from corral.supervisor.stack._settings import Settings

STDIN = "-"
"""The TEXT that means: read the message from standard input."""


def _print_update(update: ClientUpdate) -> None:
    """Tool decisions as they happen: the client sees each and the policies behind it."""
    from corral.bus import ToolDecided

    if isinstance(update, ToolDecided):
        say(f"  tool:   {_decision_line(update)}")


def _decision_line(update: ToolDecided) -> str:
    policies = f" [{', '.join(update.policy_ids)}]" if update.policy_ids else ""
    line = f"{update.agent} {update.tool} -> {update.status}{policies}"
    if update.reason:
        line += f": {update.reason}"
    if update.status == "simulated" and update.result:
        line += f" (would: {update.result.get('would', '')})"
    return line


def _print_ended(ended: ConversationEnded) -> None:
    from corral.supervisor.core._client import format_path

    say(f"  path:   {format_path(ended)}")
    say(f"  status: {ended.status}")
    if ended.reply:
        say(f"  reply:  {ended.reply}")
    if ended.reason:
        say(f"  reason: {ended.reason}")


def _message(text: str) -> str:
    """TEXT, or standard input when TEXT is ``-`` (a message longer than a command line
    may be: the kernel refuses an argument over 128 KiB)."""
    if text != STDIN:
        return text
    if sys.stdin.isatty():
        complain("reading the message from standard input (end it with Ctrl-D)")
    return sys.stdin.read()


def _refusal(settings: Settings, text: str, customer: str, conversation: str | None) -> str | None:
    """Why the supervisor would refuse this start, or this message in ``conversation``
    (corral's own check, the one it runs), or None: nothing too large is ever published."""
    from corral.bus import ConversationStart, CustomerMessage, message_problem, start_problem, subjects

    if conversation is not None:
        if customer:
            return "--customer is for a new conversation; its customer is set when it starts"
        return message_problem(
            CustomerMessage(conversation=conversation, text=text, id="m-0"), settings.limits
        )
    start = ConversationStart(conversation="c-0", text=text, customer=customer)
    return start_problem(start, subjects.DEFAULT_CLIENT, settings.limits)


@app.command()
def send(
    text: Annotated[str, typer.Argument(help="The customer's message; - reads it from standard input")],
    config: ConfigOption = None,
    customer: Annotated[str, typer.Option(help="Customer id")] = "",
    conversation: Annotated[
        str | None,
        typer.Option(help="Send the customer's next message in this conversation (one awaiting it)"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the outcome")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 30.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Policy-check and simulate every tool call; change nothing")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Start a conversation and print its id, or with --conversation send the customer's
    next message in one that awaits it; with --wait, print its tool decisions, path and
    reply (or the question the customer is asked).

    Exit codes: 0 sent (with --wait: replied, or the customer is asked something), 1
    refused/escalated/failed/killed/closed (reason printed; a message over
    limits.customer_text_bytes is refused before it is sent), 3 waiting for an approval
    (its id printed), 4 timeout.
    """
    settings = _load(config, tools=False)
    message = _message(text)
    refused = _refusal(settings, message, customer, conversation)
    if refused is not None:
        if as_json:
            print_json({"conversation": None, "status": "refused", "reason": refused})
        else:
            complain(f"refused: {refused}; nothing was sent")
        raise typer.Exit(EXIT_NOT_REPLIED)

    async def _main() -> int:
        from corral.bus import subjects
        from corral.supervisor.core._client import send_message, start_conversation

        bus = await _connect(settings, _nats_url(settings), subjects.DEFAULT_CLIENT, forever=False)
        try:
            if wait:
                return await _send_and_wait(bus, message, customer, conversation, timeout, dry_run, as_json)
            if conversation is None:
                sent = await start_conversation(bus, message, customer=customer, dry_run=dry_run)
            else:
                await send_message(bus, conversation, message)
                sent = conversation
        finally:
            await bus.close()
        status = "started" if conversation is None else "sent"
        if as_json:
            print_json({"conversation": sent, "status": status, "show": f"corral show {sent}"})
        else:
            # The id alone on stdout (`id=$(corral send ...)`); how to follow it on stderr.
            say(sent)
            complain(f"{status}; see how it goes with: corral show {sent}")
        return 0

    _run(_main())


async def _send_and_wait(
    bus: Any,
    message: str,
    customer: str,
    conversation: str | None,
    seconds: float,
    dry_run: bool,
    as_json: bool,
) -> int:
    from corral.bus import ConversationAwaiting, ConversationWaiting, MessageRefused, ToolDecided
    from corral.supervisor.core._client import message_until_settled, send_until_settled

    decisions: list[ToolDecided] = []

    def _on_update(update: ClientUpdate) -> None:
        if isinstance(update, ToolDecided):
            decisions.append(update)
            if not as_json:
                _print_update(update)

    try:
        if conversation is None:
            settled = await send_until_settled(
                bus, message, customer=customer, timeout_s=seconds, dry_run=dry_run, on_update=_on_update
            )
        else:
            settled = await message_until_settled(
                bus, conversation, message, timeout_s=seconds, on_update=_on_update
            )
    except TimeoutError:
        if as_json:
            print_json({"conversation": None, "status": "timeout", "timeout_s": seconds})
        complain(f"no outcome within {seconds:.0f}s")
        return EXIT_TIMEOUT
    if as_json:
        print_json(_settled_document(settled, decisions))
    else:
        _print_settled(settled)
    if isinstance(settled, ConversationWaiting):
        return EXIT_WAITING
    if isinstance(settled, ConversationAwaiting):
        return 0
    if isinstance(settled, MessageRefused):
        return EXIT_NOT_REPLIED
    return 0 if settled.status == "replied" else EXIT_NOT_REPLIED


def _print_settled(settled: Settled) -> None:
    from corral.bus import ConversationAwaiting, ConversationWaiting, MessageRefused

    say(f"conversation {settled.conversation}")
    if isinstance(settled, ConversationAwaiting):
        say("  status: awaiting the customer")
        say(f"  asked:  {settled.agent}: {settled.text}")
        say(f"  answer: corral send --conversation {settled.conversation} TEXT")
    elif isinstance(settled, MessageRefused):
        say("  status: message refused")
        say(f"  reason: {settled.reason}")
    elif isinstance(settled, ConversationWaiting):
        say(f"  status: waiting for approval {settled.approval_id}")
        say(f"  reason: {settled.reason}")
        approval = settled.approval_id
        say(f"  decide: corral approve {approval}  |  corral deny {approval} --reason TEXT")
    else:
        _print_ended(settled)
    say(f"  more:   corral show {settled.conversation}")


def _settled_document(settled: Settled, decisions: list[ToolDecided]) -> dict[str, Any]:
    from corral.bus import ConversationAwaiting, ConversationWaiting, MessageRefused

    tools = [
        {
            "agent": d.agent,
            "tool": d.tool,
            "status": d.status,
            "reason": d.reason,
            "policy_ids": list(d.policy_ids),
            "approval_id": d.approval_id,
        }
        for d in decisions
    ]
    if isinstance(settled, ConversationAwaiting):
        return {
            "conversation": settled.conversation,
            "status": "awaiting_customer",
            "agent": settled.agent,
            "reply": settled.text,
            "turn": settled.turn,
            "tools": tools,
        }
    if isinstance(settled, MessageRefused):
        return {
            "conversation": settled.conversation,
            "status": "refused",
            "reason": settled.reason,
            "tools": tools,
        }
    if isinstance(settled, ConversationWaiting):
        return {
            "conversation": settled.conversation,
            "status": "waiting",
            "approval_id": settled.approval_id,
            "reason": settled.reason,
            "tools": tools,
        }
    return {
        "conversation": settled.conversation,
        "status": settled.status,
        "path": [{"agent": h.agent, "confidence": h.confidence, "reason": h.reason} for h in settled.path],
        "reply": settled.reply,
        "reason": settled.reason,
        "tools": tools,
    }


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Where the team's servers are, its processes (a killed agent shows as killed), streams,
    consumers with their pending messages, and the kill switches with who set them.

    Exit codes: 0 a stack started by `corral up` runs from this directory, 3 none does
    (what the configured NATS holds is still shown).
    """
    from corral.supervisor.cli._status import print_status, status_report

    settings = _load(config, tools=False)

    async def _main() -> int:
        report = await status_report(settings)
        if as_json:
            print_json(report)
        else:
            print_status(report)
        return 0 if report["running"] else EXIT_NOT_RUNNING

    _run(_main())

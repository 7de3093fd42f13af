"""The human queue from the command line: `corral queue`, `claim`, `reply`, `handback`,
`close`. Every action is a request to the supervisor (``core._human_desk``), which decides
it, answers, and writes it into the audit chain with the operator's name."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.supervisor.cli._shared import (
    EXIT_NOT_REPLIED,
    ConfigOption,
    JsonOption,
    _connect,
    _database_url,
    _load,
    _nats_url,
    _run,
    app,
    complain,
    operator_name,
    print_json,
    say,
)

if TYPE_CHECKING:
    from corral.bus import OperatorAction, OperatorAnswer
    from corral.supervisor.stack._settings import Settings

ByOption = Annotated[str | None, typer.Option(help="Who acts (the audit chain records it)")]


@app.command()
def queue(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="At most this many, oldest first")] = 100,
    as_json: JsonOption = False,
) -> None:
    """The human queue, oldest first: escalated conversations, and those an operator answered
    whose customer has not yet, with the reason and who holds each (a claim lapses after
    queue.claim_ttl_s without an action)."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        import asyncpg

        from corral.supervisor.store._reports import human_queue

        conn = await asyncpg.connect(_database_url(settings))
        try:
            found = await human_queue(conn, limit)
        finally:
            await conn.close()
        if as_json:
            print_json({"queue": found})
            return 0
        if not found:
            say("the human queue is empty")
            return 0
        for item in found:
            holder = f"claimed by {item['claimed_by']}" if item["claimed_by"] else "unclaimed"
            waiting = "  answered, awaiting the customer" if item["status"] == "awaiting_customer" else ""
            say(
                f"{item['conversation']}  {item['customer'] or '-'}  since {item['since']}  {holder}{waiting}"
            )
            say(f"  reason: {item['reason']}")
        return 0

    _run(_main())


@app.command()
def claim(
    conversation: Annotated[str, typer.Argument(help="The escalated conversation")],
    config: ConfigOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take an escalated conversation from the queue, for yourself alone (exit 1 if someone
    else holds it, or it is not in the queue)."""
    _act(_load(config, tools=False), "claim", conversation, by, as_json)


@app.command()
def reply(
    conversation: Annotated[str, typer.Argument(help="A conversation you claimed")],
    text: Annotated[str, typer.Argument(help="What the customer is told")],
    config: ConfigOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Answer the customer as a human; their answer comes back to the queue, to you."""
    _act(_load(config, tools=False), "reply", conversation, by, as_json, text=text)


@app.command()
def handback(
    conversation: Annotated[str, typer.Argument(help="A conversation you claimed")],
    agent: Annotated[str, typer.Argument(help="The agent it goes back to (graph.edges.human)")],
    note: Annotated[str, typer.Option(help="What the agent is told")] = "",
    config: ConfigOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Hand the conversation back to an agent, with a note; it goes on from there."""
    _act(_load(config, tools=False), "handback", conversation, by, as_json, agent=agent, note=note)


@app.command("close")
def close_conversation(
    conversation: Annotated[str, typer.Argument(help="A conversation you claimed")],
    note: Annotated[str, typer.Option(help="Why")] = "",
    config: ConfigOption = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Close the conversation."""
    _act(_load(config, tools=False), "close", conversation, by, as_json, note=note)


def _act(
    settings: Settings,
    action: OperatorAction,
    conversation: str,
    by: str | None,
    as_json: bool,
    *,
    text: str = "",
    agent: str = "",
    note: str = "",
) -> None:
    async def _main() -> int:
        answer = await ask(
            settings, action, conversation, by or operator_name(), text=text, agent=agent, note=note
        )
        if as_json:
            print_json({"conversation": conversation, "action": action, **_document(answer)})
        elif answer.status == "ok":
            holder = f" (claimed by {answer.claimed_by})" if answer.claimed_by else ""
            say(f"{conversation} {_DONE[action]}{holder}")
        else:
            complain(f"refused: {answer.reason}")
        return 0 if answer.status == "ok" else EXIT_NOT_REPLIED

    _run(_main())


_DONE = {"claim": "claimed", "reply": "replied", "handback": "handed back", "close": "closed"}


async def ask(
    settings: Settings,
    action: OperatorAction,
    conversation: str,
    by: str,
    *,
    text: str = "",
    agent: str = "",
    note: str = "",
) -> OperatorAnswer:
    """Send one operator request to the supervisor and return its answer."""
    from corral.bus import OperatorAnswer, OperatorRequest, request, subjects
    from corral.supervisor.stack._credentials import ADMIN

    message = OperatorRequest(
        action=action,
        conversation=conversation,
        by=by,
        id=f"o-{uuid.uuid4().hex[:20]}",
        text=text,
        agent=agent,
        note=note,
    )
    bus = await _connect(settings, _nats_url(settings), ADMIN, forever=False)
    try:
        return await request(bus.nc, subjects.operator_requests(), message, OperatorAnswer, timeout_s=30.0)
    finally:
        await bus.close()


def _document(answer: OperatorAnswer) -> dict[str, Any]:
    return {
        "status": answer.status,
        "reason": answer.reason,
        "claimed_by": answer.claimed_by or None,
        "claim_expires_at": answer.claim_expires_at or None,
    }

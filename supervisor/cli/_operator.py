"""Operator commands: kill switches, credentials, audit, approvals, rollback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.bus import (
    KillTarget,
    clear_kill,
    set_kill,
    subjects,
)
from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    _connect,
    _database_url,
    _load,
    _nats_url,
    _run,
    app,
    console,
    err_console,
    kill_app,
    revive_app,
)
from corral.supervisor.stack._credentials import ADMIN
from corral.supervisor.stack._settings import Settings

# --- kill switches and credentials ----------------------------------------------------


def _switch(settings: Settings, target: KillTarget, name: str, reason: str | None) -> None:
    async def _main() -> int:
        from corral.supervisor.store._agent_controls import kill_agent, revive_agent
        from corral.supervisor.store._store import Store

        by = os.environ.get("USER", "")
        if target == "agent":
            # The gateway's own view first: this returns once no call of the agent is in
            # flight, and every call after it is refused, whatever the agent does to the bus.
            store = await Store.open(_database_url(settings), min_size=1, max_size=1)
            try:
                if reason is None:
                    await revive_agent(store.pool, name)
                else:
                    await kill_agent(store.pool, name, reason, by)
            finally:
                await store.close()
        bus = await _connect(settings, _nats_url(settings), ADMIN, forever=False)
        try:
            if reason is None:
                changed = await clear_kill(bus.js, target, name)
                console.print(f"{target} {name} revived" if changed else f"{target} {name} was not killed")
            else:
                await set_kill(bus.js, target, name, reason, by=by)
                console.print(f"{target} {name} killed: {reason}")
        finally:
            await bus.close()
        return 0

    _run(_main())


@kill_app.command("agent")
def kill_agent(
    name: Annotated[str, typer.Argument(help="The agent to kill")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why; shown to everyone it affects")] = "killed by an operator",
) -> None:
    """Stop forwarding to NAME, refuse what it sends, revoke its identity, escalate its
    waiting conversations to a human."""
    settings = _load(config)
    if name not in settings.config.agents:
        err_console.print(f"unknown agent {name!r}; defined: {', '.join(settings.loaded.agent_names)}")
        raise typer.Exit(EXIT_CONFIG)
    _switch(settings, "agent", name, reason)


@kill_app.command("conversation")
def kill_conversation(
    conversation: Annotated[str, typer.Argument(help="The conversation id")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why")] = "killed by an operator",
) -> None:
    """End a conversation now: no further step of it runs anywhere."""
    settings = _load(config)
    try:
        subjects.check_id(conversation, "conversation id")
    except ValueError as exc:
        err_console.print(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    _switch(settings, "conversation", conversation, reason)


@revive_app.command("agent")
def revive_agent(
    name: Annotated[str, typer.Argument(help="The agent to revive")], config: ConfigOption = None
) -> None:
    """Restore a killed agent: its identity is accepted again and work flows to it."""
    _switch(_load(config), "agent", name, None)


@app.command()
def creds(
    config: ConfigOption = None,
    out: Annotated[str | None, typer.Option(help="Directory (default: <state_dir>/creds)")] = None,
) -> None:
    """Write one nkey identity per agent, supervisor, client and admin, and the nats-server
    authorization block that grants each exactly its permissions (for an external NATS)."""
    from corral.supervisor.stack._credentials import authorization_block, identities

    settings = _load(config)
    directory = Path(out) if out else settings.creds_dir
    ids = identities(settings.loaded, directory)
    block = directory / "nats-authorization.conf"
    block.write_text(authorization_block(ids))
    console.print(f"wrote {len(ids)} identities (mode 0600) and {block}", highlight=False)
    for identity in ids:
        console.print(f"  {identity.name:<24} {identity.seed_file}", highlight=False)
    console.print(
        "Add `include nats-authorization.conf` to the server's config and reload it; give each "
        "process only its own seed (CORRAL_CREDS=path)."
    )


# --- audit ----------------------------------------------------------------------------

audit_app = typer.Typer(no_args_is_help=True, help="Inspect the audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    require_anchors: Annotated[
        bool,
        typer.Option(
            "--require-anchors",
            help="Fail (exit 3) unless signed anchors confirm the chain: without them, a"
            " truncated or rewritten log would not show.",
        ),
    ] = False,
) -> None:
    """Recompute every audit record's hash and its link to the record before it, and check
    the chain against the supervisor's signed anchors (stream ``CORRAL_AUDIT``).

    Anchors are trusted when signed by the key of ``<state_dir>/creds/supervisor.nk`` or one
    of ``CORRAL_AUDIT_PUBLIC_KEYS`` (comma-separated nkeys). Without NATS or a trusted key,
    only the chain is checked, and a note says so.

    Exit codes: 0 the chain is intact (the record count is printed), 1 a record is broken,
    rewritten, forged or missing, or an anchor is forged (the first bad record and the
    reason go to stderr), 3 with ``--require-anchors``, the chain is intact but no signed
    anchor could confirm it (the note says why).
    """
    settings = _load(config)

    async def _main() -> int:
        import asyncpg

        from corral.supervisor.audit._anchor_check import verify_anchored
        from corral.supervisor.errors import StoreError
        from corral.supervisor.store._store import Store

        url = _database_url(settings)
        # Opening the store applies pending migrations, so a fresh database verifies as empty.
        await (await Store.open(url, min_size=1, max_size=1)).close()
        anchors, forged, note = await _audit_anchors(settings)
        try:
            conn = await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            result = await verify_anchored(conn, anchors)
        finally:
            await conn.close()
        if note:
            err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
        if result.first_broken is not None:
            err_console.print(
                f"audit log broken at record {result.first_broken}: {result.problem}",
                highlight=False,
                soft_wrap=True,
            )
            return 1
        if forged:
            err_console.print(
                f"{forged} anchors in the audit stream are not signed by the supervisor: forged",
                highlight=False,
            )
            return 1
        console.print(f"audit log intact: {result.count} records", highlight=False)
        if result.anchors:
            console.print(
                f"anchored: {result.anchored} records confirmed by {result.anchors} signed anchors",
                highlight=False,
            )
        if result.head is not None:
            console.print(f"head: {result.head}", highlight=False, soft_wrap=True)
        if require_anchors and not result.anchors:
            err_console.print(
                "not confirmed: no signed anchor checked the chain (--require-anchors)", highlight=False
            )
            return 3
        return 0

    _run(_main())


async def _audit_anchors(settings: Settings) -> tuple[list[Any], int, str]:
    """(valid anchors, forged ones, a note when they could not be read)."""
    from corral.bus import BusError
    from corral.supervisor.audit._anchors import read_anchors, trusted_keys_from
    from corral.supervisor.stack._runtime import Runtime

    keys = trusted_keys_from([settings.creds_dir / "supervisor.nk"], settings.audit_public_keys)
    running = Runtime.read(settings.state_dir)
    url = settings.nats_url or (running.nats_url if running else None)
    if url is None:
        return [], 0, "no NATS (set NATS_URL or start the team): anchors not checked"
    if not keys:
        return [], 0, "no trusted key (CORRAL_AUDIT_PUBLIC_KEYS or creds/supervisor.nk): anchors not checked"
    try:
        bus = await _connect(settings, url, ADMIN, forever=False)
    except BusError as exc:
        return [], 0, f"cannot reach NATS ({exc}): anchors not checked"
    try:
        anchors, forged = await read_anchors(bus.js, keys)
    finally:
        await bus.close()
    if not anchors:
        return [], forged, "no anchors yet: a rewritten or truncated log would not show"
    return anchors, forged, ""


# --- approvals and compensation -------------------------------------------------------


async def _operator_pool(settings: Settings) -> Any:
    import asyncpg

    return await asyncpg.create_pool(_database_url(settings), min_size=1, max_size=2)


@app.command()
def approvals(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """List the approval requests waiting for a decision."""
    settings = _load(config)

    async def _main() -> int:
        from rich.table import Table

        from corral.supervisor.gateway._approvals import pending_approvals

        pool = await _operator_pool(settings)
        try:
            pending = await pending_approvals(pool)
        finally:
            await pool.close()
        if as_json:
            console.print_json(json.dumps([a.__dict__ for a in pending]))
            return 0
        table = Table(
            "id",
            "conversation",
            "agent",
            "tool",
            "arguments",
            "approver",
            "policies",
            title="pending approvals",
        )
        for a in pending:
            table.add_row(
                a.id,
                a.conversation,
                a.agent,
                a.tool,
                json.dumps(a.arguments),
                a.approver,
                ", ".join(a.policy_ids),
            )
        console.print(table)
        return 0

    _run(_main())


async def _decide(settings: Settings, approval_id: str, approve: bool, by: str, reason: str) -> Any:
    """Record the decision, then tell the supervisor (it re-reads it from the database).

    A grant is refused when the approval's conversation was killed (the switch may not have
    reached the database yet), ended, or its agent was killed.
    """
    from corral.bus import ApprovalDecided, list_kills, publish
    from corral.supervisor.gateway._approvals import ApprovalError, decide_approval

    bus = await _connect(settings, _nats_url(settings), ADMIN, forever=False)
    try:
        pool = await _operator_pool(settings)
        try:
            if approve:
                conversation = await pool.fetchval(
                    "SELECT conversation FROM approvals WHERE id=$1", approval_id
                )
                kills = await list_kills(bus.js) if conversation is not None else {}
                switch = kills.get(subjects.conversation_control_key(conversation or ""))
                if switch is not None:
                    raise ApprovalError(
                        f"approval {approval_id} cannot be granted: conversation {conversation} is killed"
                        f" ({switch.reason})"
                    )
            record = await decide_approval(pool, approval_id, approve=approve, by=by, reason=reason)
        finally:
            await pool.close()
        await publish(
            bus.js,
            subjects.approval_decisions(),
            ApprovalDecided(approval_id=approval_id),
            msg_id=f"approval.{approval_id}",
        )
    finally:
        await bus.close()
    return record


def _decide_approval(settings: Settings, approval_id: str, approve: bool, by: str, reason: str) -> None:
    async def _main() -> int:
        from corral.supervisor.gateway._approvals import ApprovalError

        try:
            record = await _decide(settings, approval_id, approve, by, reason)
        except ApprovalError as exc:
            err_console.print(str(exc))
            return 1
        verb = "approved" if approve else "denied"
        console.print(
            f"{approval_id} {verb} by {by}: {record.agent} {record.tool} "
            f"{json.dumps(record.arguments)} in {record.conversation}",
            highlight=False,
        )
        return 0

    _run(_main())


@app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who approves (a person, or a role)")] = None,
) -> None:
    """Grant one pending approval; the waiting conversation resumes and the call goes through."""
    _decide_approval(_load(config), approval_id, True, by or os.environ.get("USER", "operator"), "")


@app.command()
def deny(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    reason: Annotated[str, typer.Option(help="Why; the agent and the client see it")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who denies")] = None,
) -> None:
    """Deny one pending approval; the waiting conversation resumes with the denial."""
    _decide_approval(_load(config), approval_id, False, by or os.environ.get("USER", "operator"), reason)


@app.command()
def rollback(
    conversation: Annotated[str, typer.Argument(help="The conversation to compensate")],
    config: ConfigOption = None,
) -> None:
    """Run the undo of every tool call the conversation applied, newest first."""
    settings = _load(config)

    async def _main() -> int:
        from corral.supervisor.gateway._rollback import rollback as run_rollback

        by = os.environ.get("USER", "operator")
        pool = await _operator_pool(settings)
        try:
            report = await run_rollback(pool, settings.tools, conversation, by)
        finally:
            await pool.close()
        if not report:
            console.print(f"nothing to roll back in {conversation}")
        for entry in report:
            console.print(f"  {entry['tool']} -> {entry['undo'] or '-'}: {entry['outcome']}", highlight=False)
        return 0

    _run(_main())

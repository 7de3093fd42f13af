"""Operator commands: kill switches, credentials, audit, approvals, rollback.

Every id a command is given must exist (a conversation, an approval; an agent of the
config): an unknown one exits ``EXIT_CONFIG`` and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    JsonOption,
    UnknownIdError,
    _connect,
    _database_url,
    _load,
    _nats_url,
    _run,
    app,
    complain,
    kill_app,
    operator_name,
    print_json,
    print_table,
    revive_app,
    say,
)

if TYPE_CHECKING:
    from corral.bus import KillTarget
    from corral.supervisor.stack._settings import Settings

# --- kill switches and credentials ----------------------------------------------------


def _switch(settings: Settings, target: KillTarget, name: str, reason: str | None) -> None:
    """Flip the switch as the API's operators do (``core._switches``: the gateway's row,
    then the KV switch; audited with the operator's name)."""

    async def _main() -> int:
        from corral.bus import SwitchRequest
        from corral.supervisor.core._switches import flip_switch
        from corral.supervisor.stack._credentials import ADMIN
        from corral.supervisor.store._store import Store

        by = operator_name()
        request = SwitchRequest(target=target, name=name, by=by, reason=reason or "", revive=reason is None)
        store = await Store.open(_database_url(settings), min_size=1, max_size=1)
        try:
            bus = await _connect(settings, _nats_url(settings), ADMIN, forever=False)
            try:
                answer = await flip_switch(store.pool, bus.js, request, settings.loaded.agent_names)
            finally:
                await bus.close()
        finally:
            await store.close()
        if answer.status != "ok":
            # A switch for a conversation that never existed would stay forever: nothing
            # ends it, and nothing removes it.
            raise UnknownIdError(f"{answer.reason}: `corral conversations` lists them")
        if reason is None:
            say(f"{target} {name} was not killed" if answer.reason else f"{target} {name} revived")
        else:
            say(f"{target} {name} killed by {by}: {reason}")
        return 0

    _run(_main())


def _known_agent(settings: Settings, name: str) -> None:
    if name not in settings.config.agents:
        complain(f"unknown agent {name!r}; {settings.path} defines: {', '.join(settings.loaded.agent_names)}")
        raise typer.Exit(EXIT_CONFIG)


@kill_app.command("agent")
def kill_agent(
    name: Annotated[str, typer.Argument(help="The agent to kill")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why; shown to everyone it affects")] = "killed by an operator",
) -> None:
    """Stop forwarding to NAME, refuse what it sends, revoke its identity, escalate its
    waiting conversations to a human."""
    settings = _load(config)
    _known_agent(settings, name)
    _switch(settings, "agent", name, reason)


@kill_app.command("conversation")
def kill_conversation(
    conversation: Annotated[str, typer.Argument(help="The conversation id")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why")] = "killed by an operator",
) -> None:
    """End a conversation now: no further step of it runs anywhere. An unknown id exits 2."""
    from corral.bus import subjects

    settings = _load(config)
    try:
        subjects.check_id(conversation, "conversation id")
    except ValueError as exc:
        complain(str(exc))
        raise typer.Exit(EXIT_CONFIG) from None
    _switch(settings, "conversation", conversation, reason)


@revive_app.command("agent")
def revive_agent(
    name: Annotated[str, typer.Argument(help="The agent to revive")], config: ConfigOption = None
) -> None:
    """Restore a killed agent: its identity is accepted again and work flows to it."""
    settings = _load(config)
    _known_agent(settings, name)
    _switch(settings, "agent", name, None)


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
    say(f"wrote {len(ids)} identities (mode 0600) and {block}")
    for identity in ids:
        say(f"  {identity.name:<24} {identity.seed_file}")
    say(
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
            complain(f"note: {note}")
        if result.first_broken is not None:
            complain(f"audit log broken at record {result.first_broken}: {result.problem}")
            return 1
        if forged:
            complain(f"{forged} anchors in the audit stream are not signed by the supervisor: forged")
            return 1
        say(f"audit log intact: {result.count} records")
        if result.anchors:
            say(f"anchored: {result.anchored} records confirmed by {result.anchors} signed anchors")
        if result.head is not None:
            say(f"head: {result.head}")
        if require_anchors and not result.anchors:
            complain("not confirmed: no signed anchor checked the chain (--require-anchors)")
            return 3
        return 0

    _run(_main())


async def _audit_anchors(settings: Settings) -> tuple[list[Any], int, str]:
    """(valid anchors, forged ones, a note when they could not be read)."""
    from corral.bus import BusError
    from corral.supervisor.audit._anchors import read_anchors, trusted_keys_from
    from corral.supervisor.stack._credentials import ADMIN
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

    from corral.supervisor.cli._shared import without_password
    from corral.supervisor.errors import StoreError

    url = _database_url(settings)
    try:
        return await asyncpg.create_pool(url, min_size=1, max_size=2)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to PostgreSQL at {without_password(url)}: {exc}") from exc


@app.command()
def approvals(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the approval requests waiting for a decision."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        from corral.supervisor.gateway._approvals import pending_approvals

        pool = await _operator_pool(settings)
        try:
            # No tables yet (the team never started on this database): nothing waits.
            migrated = await pool.fetchval("SELECT to_regclass('approvals') IS NOT NULL")
            pending = await pending_approvals(pool) if migrated else []
        finally:
            await pool.close()
        if as_json:
            print_json([a.__dict__ for a in pending])
        elif not pending:
            say("no approvals are waiting for a decision")
        else:
            print_table(
                ["id", "conversation", "agent", "tool", "arguments", "approver", "policies"],
                [
                    [
                        a.id,
                        a.conversation,
                        a.agent,
                        a.tool,
                        json.dumps(a.arguments, sort_keys=True),
                        a.approver,
                        ", ".join(a.policy_ids),
                    ]
                    for a in pending
                ],
                title="pending approvals",
            )
        return 0

    _run(_main())


async def _decide(settings: Settings, approval_id: str, approve: bool, by: str, reason: str) -> Any:
    """Record the decision, then tell the supervisor (it re-reads it from the database).

    A grant is refused when the approval's conversation was killed (the switch may not have
    reached the database yet), ended, or its agent was killed.

    Raises:
        UnknownIdError: there is no approval ``approval_id``.
        ApprovalError: it cannot be decided (already decided, expired, or see above).
    """
    from corral.bus import ApprovalDecided, list_kills, publish, subjects
    from corral.supervisor.gateway._approvals import ApprovalError, decide_approval, decider_problem
    from corral.supervisor.stack._credentials import ADMIN

    pool = await _operator_pool(settings)
    try:
        migrated = await pool.fetchval("SELECT to_regclass('approvals') IS NOT NULL")
        row = (
            await pool.fetchrow("SELECT conversation, approver FROM approvals WHERE id=$1", approval_id)
            if migrated
            else None
        )
        if row is None:
            raise UnknownIdError(f"no approval {approval_id!r}: `corral approvals` lists the pending ones")
        conversation = row["conversation"]
        tools = settings.config.tools
        why = decider_problem(row["approver"], by, tools.approvers if tools is not None else {})
        if why is not None:
            raise ApprovalError(f"approval {approval_id} cannot be decided: {why}")
        bus = await _connect(settings, _nats_url(settings), ADMIN, forever=False)
        try:
            if approve:
                switch = (await list_kills(bus.js)).get(subjects.conversation_control_key(conversation))
                if switch is not None:
                    raise ApprovalError(
                        f"approval {approval_id} cannot be granted: conversation {conversation} is killed"
                        f" ({switch.reason})"
                    )
            record = await decide_approval(pool, approval_id, approve=approve, by=by, reason=reason)
            await publish(
                bus.js,
                subjects.approval_decisions(),
                ApprovalDecided(approval_id=approval_id),
                msg_id=f"approval.{approval_id}",
            )
        finally:
            await bus.close()
    finally:
        await pool.close()
    return record


def _decide_approval(settings: Settings, approval_id: str, approve: bool, by: str, reason: str) -> None:
    async def _main() -> int:
        from corral.supervisor.gateway._approvals import ApprovalError

        try:
            record = await _decide(settings, approval_id, approve, by, reason)
        except ApprovalError as exc:
            complain(str(exc))
            return 1
        verb = "approved" if approve else "denied"
        say(
            f"{approval_id} {verb} by {by}: {record.agent} {record.tool} "
            f"{json.dumps(record.arguments)} in {record.conversation}"
        )
        return 0

    _run(_main())


@app.command()
def approve(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who approves (a person, or a role)")] = None,
) -> None:
    """Grant one pending approval; the waiting conversation resumes and the call goes through.
    An unknown id exits 2."""
    _decide_approval(_load(config, tools=False), approval_id, True, by or operator_name(), "")


@app.command()
def deny(
    approval_id: Annotated[str, typer.Argument(help="The approval's id")],
    reason: Annotated[str, typer.Option(help="Why; the agent and the client see it")],
    config: ConfigOption = None,
    by: Annotated[str | None, typer.Option(help="Who denies")] = None,
) -> None:
    """Deny one pending approval; the waiting conversation resumes with the denial. An
    unknown id exits 2."""
    _decide_approval(_load(config, tools=False), approval_id, False, by or operator_name(), reason)


@app.command()
def rollback(
    conversation: Annotated[str, typer.Argument(help="The conversation to compensate")],
    config: ConfigOption = None,
) -> None:
    """Run the undo of every tool call the conversation applied, newest first, each once,
    and say what each undid. An unknown id exits 2; an undo that fails stops the rollback
    (exit 1): run it again to go on from there."""
    settings = _load(config)

    async def _main() -> int:
        from corral.supervisor.gateway._rollback import rollback as run_rollback
        from corral.supervisor.store._reports import conversation_exists

        pool = await _operator_pool(settings)
        try:
            if not await conversation_exists(pool, conversation):
                raise UnknownIdError(f"no conversation {conversation!r}: `corral conversations` lists them")
            try:
                report = await run_rollback(pool, settings.tools, conversation, operator_name())
            except Exception as exc:
                # The undos before it committed (each with its ledger mark): a second run goes on.
                complain(
                    f"rollback of {conversation} stopped: an undo failed: {exc!r}; run it again to retry"
                )
                return 1
        finally:
            await pool.close()
        _print_rollback(conversation, report)
        return 0

    _run(_main())


def _print_rollback(conversation: str, report: list[dict[str, Any]]) -> None:
    """One sentence per call, then what it adds up to."""
    if not report:
        say(f"nothing to roll back in {conversation}: no applied call that changed state is left to undo")
        return
    undone = failed = kept = 0
    for entry in report:
        outcome = entry["outcome"]
        if entry["undo"] is None:
            kept += 1
            say(f"{entry['tool']} cannot be undone (it declares no undo): left as it is")
        elif isinstance(outcome, dict) and "error" in outcome:
            failed += 1
            say(f"{entry['tool']} was not undone: {entry['undo']} failed: {outcome['error']}")
        else:
            undone += 1
            said = (
                ", ".join(f"{k} {json.dumps(v)}" for k, v in outcome.items())
                if isinstance(outcome, dict)
                else outcome
            )
            say(f"{entry['tool']} undone by {entry['undo']}" + (f" ({said})" if said else ""))
    parts = (
        [f"{undone} undone"]
        + ([f"{failed} failed"] if failed else [])
        + ([f"{kept} left as they are"] if kept else [])
    )
    say(f"rolled back {conversation}: {', '.join(parts)} of {len(report)} calls")

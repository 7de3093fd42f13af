"""`corral api run` (the HTTP/SSE API as a service) and `corral api-key create|revoke`."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.supervisor.cli._shared import (
    EXIT_CONFIG,
    ConfigOption,
    JsonOption,
    _connect,
    _database_url,
    _load,
    _nats_url,
    _run,
    _serve,
    _setup_logging,
    api_app,
    api_key_app,
    app,
    complain,
    operator_name,
    print_json,
    say,
)


@api_app.command("run")
def api_run(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Listen here instead of api.port")] = None,
) -> None:
    """Run the HTTP/SSE API: conversations for clients, the human queue for operators."""
    settings = _load(config, tools=False)
    _setup_logging()

    async def _main() -> int:
        from corral.bus import ConnectionGuard
        from corral.supervisor.api._app import ApiSettings
        from corral.supervisor.api._base import ConsoleInfo
        from corral.supervisor.api._server import ApiServer
        from corral.supervisor.cli._services import _Together
        from corral.supervisor.stack._credentials import API
        from corral.supervisor.stack._readiness import announced

        section = settings.config.api
        bus = await _connect(settings, _nats_url(settings), API)
        try:
            server = ApiServer(
                bus,
                ApiSettings(
                    limits=settings.limits,
                    rate_per_s=section.rate_per_s,
                    burst=section.burst,
                    max_body_bytes=section.max_body_bytes,
                    console=ConsoleInfo(
                        entry=settings.graph.entry,
                        edges=dict(settings.graph.edges),
                        replicas={name: agent.replicas for name, agent in settings.config.agents.items()},
                    ),
                ),
                host=section.host,
                port=section.port if port is None else port,
            )
            await _serve(announced(_Together([server, ConnectionGuard(bus)])))
        finally:
            await bus.close()
        return 0

    _run(_main())


@api_key_app.command("create")
def api_key_create(
    client: Annotated[str, typer.Option(help="The client it acts as (its conversations are this client's)")],
    customer: Annotated[str | None, typer.Option(help="The one customer it may act for")] = None,
    operator: Annotated[bool, typer.Option("--operator", help="It may use the operator endpoints")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make an API key and print it, once: only its digest is stored."""
    from corral.bus import subjects
    from corral.supervisor.api._keys import new_key

    try:
        subjects.check_id(client, "client")
    except ValueError as exc:
        complain(str(exc))
        raise typer.Exit(EXIT_CONFIG) from exc
    settings = _load(config, tools=False)
    made = new_key()

    async def _main() -> int:
        import asyncpg

        conn = await asyncpg.connect(_database_url(settings))
        try:
            await conn.execute(
                "INSERT INTO api_keys (id, digest, client, customer, operator, created_by)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                made.key_id,
                made.digest,
                client,
                customer,
                operator,
                operator_name(),
            )
        finally:
            await conn.close()
        if as_json:
            print_json(
                {
                    "key_id": made.key_id,
                    "key": made.key,
                    "client": client,
                    "customer": customer,
                    "operator": operator,
                }
            )
        else:
            say(made.key)
            complain(
                f"key {made.key_id} for client {client}"
                + (f", customer {customer}" if customer else "")
                + (" (operator)" if operator else "")
                + ": shown once, keep it"
            )
        return 0

    _run(_main())


@api_key_app.command("revoke")
def api_key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the part after ck_)")],
    config: ConfigOption = None,
) -> None:
    """Revoke an API key (the API stops taking it within 10 s)."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        import asyncpg

        conn = await asyncpg.connect(_database_url(settings))
        try:
            done = await conn.fetchval(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id",
                key_id,
            )
        finally:
            await conn.close()
        if done is None:
            complain(f"no live key {key_id!r}")
            return EXIT_CONFIG
        say(f"key {key_id} revoked")
        return 0

    _run(_main())


@app.command("console-login")
def console_login(
    config: ConfigOption = None,
    operator: Annotated[
        str, typer.Option(help="The operator it signs in (the audit chain's name)")
    ] = "console",
) -> None:
    """Print the console's URL with a new one-time operator login (valid 15 minutes, once)."""
    settings = _load(config, tools=False)

    async def _main() -> int:
        from corral.supervisor.cli._stack import print_console_login
        from corral.supervisor.stack._runtime import Runtime

        runtime = Runtime.read(settings.state_dir)
        section = settings.config.api
        url = (runtime.api_url if runtime else None) or f"http://{section.host}:{section.port}"
        await print_console_login(settings, url, operator)
        return 0

    _run(_main())

"""The database roles of a stack: migrations as the owner, the supervisor as ``corral_supervisor``.

``corral up`` (and ``corral migrate``) run ``prepare_database`` with the owner's DSN: the
migrations (0012 creates the roles ``corral_supervisor`` and ``corral_tools`` and grants them
what they need), then the tool module's ``setup(conn)``, whose schemas ``corral_tools`` may
then use. ``supervisor_login`` gives ``corral_supervisor`` a fresh password, when the owner
may, and returns its DSN: that is what the supervisor connects with.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from corral.supervisor.config._tools_module import import_tools
from corral.supervisor.errors import StoreError

logger = logging.getLogger(__name__)

SUPERVISOR_ROLE = "corral_supervisor"
"""May append to ``audit_log`` only through ``corral_audit_append``."""
TOOLS_ROLE = "corral_tools"
"""What tool statements run as: the tool module's schemas only."""


async def prepare_database(owner_dsn: str, tools_module: str | None) -> None:
    """As the owner: apply the migrations, run the tools' ``setup(conn)``, and let
    ``corral_tools`` use the schemas the module declares (``SCHEMAS``).

    Raises:
        StoreError: if PostgreSQL refuses.
    """
    from corral.supervisor.store._store import Store

    await (await Store.open(owner_dsn, min_size=1, max_size=1)).close()
    if tools_module is None:
        return
    module = import_tools(tools_module)
    conn = await _connect(owner_dsn)
    try:
        setup = getattr(module, "setup", None)
        if setup is not None:
            await setup(conn)
        await grant_tool_role(conn, getattr(module, "SCHEMAS", ()))
        from corral.supervisor.store._tool_statements import install_statements

        await install_statements(conn, getattr(module, "TOOLS", ()))
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot prepare the tools' schema: {exc}", retryable=False) from exc
    finally:
        await conn.close()


async def supervisor_login(owner_dsn: str) -> str | None:
    """Give ``corral_supervisor`` a fresh random password and return a DSN for it, or None
    when the owner may not (then set ``database.supervisor_url``), or ``owner_dsn`` is not
    a URL.

    The password is never written down: the launcher hands the DSN to the supervisor's
    environment only. Roles belong to the cluster: two stacks on one cluster that both
    derive it take turns (the earlier one's new connections are refused); give such
    stacks ``database.supervisor_url`` instead.
    """
    parts = urlsplit(owner_dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        return None
    password = secrets.token_urlsafe(24)
    try:
        await set_password(owner_dsn, password)
    except StoreError as exc:
        logger.warning("cannot give %s a password (%s): set database.supervisor_url", SUPERVISOR_ROLE, exc)
        return None
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{SUPERVISOR_ROLE}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


async def set_password(owner_dsn: str, password: str) -> None:
    """Make ``password`` ``corral_supervisor``'s (and let it log in).

    Raises:
        StoreError: if the owner may not.
    """
    conn = await _connect(owner_dsn)
    try:
        # ALTER ROLE takes no parameters: quote the literal in the database.
        literal = await conn.fetchval("SELECT quote_literal($1::text)", password)
        await conn.execute(f"ALTER ROLE {SUPERVISOR_ROLE} LOGIN PASSWORD {literal}")
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot set {SUPERVISOR_ROLE}'s password: {exc}", retryable=False) from exc
    finally:
        await conn.close()


async def can_serve(dsn: str, tools_module: str | None) -> str | None:
    """Why a service connecting with ``dsn`` would fail at start, or None if it would not.

    It opens the store (which applies pending migrations) and runs the tools' ``setup`` in a
    transaction it rolls back, as ``corral supervisor run`` does.
    """
    from corral.supervisor.store._store import Store

    try:
        await (await Store.open(dsn, min_size=1, max_size=1)).close()
    except (StoreError, asyncpg.PostgresError) as exc:
        return f"the store does not open: {exc}"
    if tools_module is None:
        return None
    setup: Callable[[Any], Awaitable[None]] | None = getattr(import_tools(tools_module), "setup", None)
    if setup is None:
        return None
    conn = await _connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            await setup(conn)
        except asyncpg.PostgresError as exc:
            return f"the tools' setup fails: {exc}"
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    return None


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc


async def grant_tool_role(conn: asyncpg.Connection, schemas: Iterable[str]) -> list[str]:
    """Let ``corral_tools`` (the role tool statements run under) use ``schemas``: their
    tables (read and write) and sequences, today's and those created later by the role
    running this. Nothing else: corral's own tables stay out of a tool's reach.

    Run it where the tools module's ``setup(conn)`` runs, with the schemas the module
    declares (``SCHEMAS = ["shop"]``). Only schemas the current role owns (or may act for)
    are granted; the others are left to their owner (``corral up`` grants as the owner).

    Returns:
        The schemas granted.
    """
    owned = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])"
        " AND pg_has_role(current_user, nspowner, 'MEMBER') ORDER BY nspname",
        [_identifier(schema) and schema for schema in schemas],
    )
    granted = [row["nspname"] for row in owned]
    for schema in granted:
        name = _identifier(schema)
        await conn.execute(
            f"GRANT USAGE ON SCHEMA {name} TO {TOOLS_ROLE};"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {name} TO {TOOLS_ROLE};"
            f" GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {name} TO {TOOLS_ROLE};"
            f" ALTER DEFAULT PRIVILEGES IN SCHEMA {name}"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {TOOLS_ROLE};"
            f" ALTER DEFAULT PRIVILEGES IN SCHEMA {name}"
            f" GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {TOOLS_ROLE}"
        )
    return granted


def _identifier(name: str) -> str:
    if not name.replace("_", "").isalnum() or not name.isascii() or name[0].isdigit():
        raise ValueError(f"not a plain schema name: {name!r}")
    return f'"{name}"'

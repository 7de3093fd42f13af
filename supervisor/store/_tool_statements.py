"""Statements that tools declare (``corral.SqlTool``), installed in the database.

Each statement becomes a function in the schema ``corral_sql`` (migration 0013): PL/pgSQL,
VOLATILE (each query sees what committed before it, as a statement of its own would),
SECURITY DEFINER and owned by ``corral_tool_statements``, a member of ``corral_tools``:
whichever statement calls it, it runs with the tools' privileges. ``corral_tools`` is not a
member of its owner, so a tool's statement cannot alter it (nor make it run as its caller),
and its search_path is pinned (names in it must be schema-qualified). Its name carries a
digest of its text and parameter types: a changed statement is a new function, and a
gateway uses only the functions it finds installed as these are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import asyncpg

from corral.supervisor.store._roles import SUPERVISOR_ROLE

SQL_SCHEMA = "corral_sql"
STATEMENTS_ROLE = "corral_tool_statements"
"""Owns the installed statements; a member of ``corral_tools``, and nobody's role."""
_QUOTE = "$corral_statement$"
_ROW = "corral_statement_row"  # the function's one variable: no name a statement would use


@dataclass(frozen=True)
class DeclaredStatement:
    """One statement as installed: ``function(types) RETURNS jsonb``, the value of the first
    row's ``column``."""

    function: str
    types: tuple[str, ...]
    sql: str
    column: str


@runtime_checkable
class DeclaresStatements(Protocol):
    def declared_statements(self) -> list[DeclaredStatement]: ...


async def install_statements(conn: asyncpg.Connection, tools: Iterable[object]) -> list[str]:
    """As the database owner: install the statements ``tools`` declare. Idempotent; returns
    the functions installed."""
    installed = []
    for tool in tools:
        if isinstance(tool, DeclaresStatements):
            for statement in tool.declared_statements():
                await _install(conn, statement)
                installed.append(statement.function)
    return installed


async def _install(conn: asyncpg.Connection, statement: DeclaredStatement) -> None:
    body = statement.sql.strip().rstrip(";")
    if _QUOTE in body:
        raise ValueError(f"{statement.function}: the statement may not contain {_QUOTE}")
    signature = f"{statement.function}({', '.join(statement.types)})"
    async with conn.transaction():
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION {signature} RETURNS jsonb LANGUAGE plpgsql VOLATILE"
            " SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS"
            f" {_QUOTE} #variable_conflict use_column\n DECLARE {_ROW} record; BEGIN FOR {_ROW} IN {body}"
            f" LOOP RETURN {_ROW}.{statement.column}; END LOOP; RETURN NULL; END {_QUOTE};"
            f" ALTER FUNCTION {signature} OWNER TO {STATEMENTS_ROLE};"
            f" REVOKE ALL ON FUNCTION {signature} FROM PUBLIC;"
            f" GRANT EXECUTE ON FUNCTION {signature} TO {SUPERVISOR_ROLE}"
        )


async def installed_functions(conn: asyncpg.Connection | asyncpg.Pool) -> set[str]:
    """The statement functions installed as ``install_statements`` installs them (in
    ``corral_sql``, SECURITY DEFINER, owned by ``corral_tool_statements``)."""
    rows = await conn.fetch(
        "SELECT n.nspname || '.' || p.proname AS name FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner"
        " WHERE n.nspname = $1 AND p.prosecdef AND r.rolname = $2",
        SQL_SCHEMA,
        STATEMENTS_ROLE,
    )
    return {row["name"] for row in rows}

"""PostgreSQL out of reach: what asyncpg raises then, and the error corral raises for it.

Apart from ``corral.supervisor.errors`` so that reading the error tree (every command does)
does not load asyncpg.
"""

from __future__ import annotations

import asyncpg

from corral.supervisor.errors import StoreError

UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
"""What asyncpg raises when PostgreSQL cannot be reached or the connection broke (not a
statement it refused): trying again later may work. ``unavailable()`` says so."""


def unavailable(exc: BaseException) -> StoreError:
    """``exc``, one of ``UNAVAILABLE``, as the retryable ``StoreError`` every caller raises."""
    return StoreError(f"PostgreSQL unavailable: {exc}", retryable=True)

"""Who the customer is: an authenticating tool binds an anonymous conversation's customer.

A conversation may start anonymous (a web chat before login). A tool that config marks as
authenticating (``tools.authenticating: {tool: result field}``) names the customer in its
own result, having checked what the customer gave (an email and an order number, say). The
gateway binds that customer to the conversation in the call's own transaction, with its
audit record:

- only from the tool's result, never from the model's arguments;
- only once: a conversation that has a customer keeps it (another name is refused, and
  the refusal audited);
- only from a call that succeeded (an ``error`` result binds nothing).

The binding bumps the conversation's version, so the supervisor's next decision reads it
(its saves are conditional on the version it read), and every later tool call acts for
the bound customer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

from corral.bus import ToolCall
from corral.supervisor.audit._audit import append_audit, digest_arguments
from corral.supervisor.gateway._records import audit_entry

logger = logging.getLogger(__name__)

BIND = "bind_customer"
"""The audit decision of a binding (applied, or refused)."""

_MAX_CUSTOMER_CHARS = 256

_BIND = (
    "UPDATE conversations SET customer=$2, version=version + 1, updated_at=now()"
    " WHERE id=$1 AND customer='' RETURNING id"
)


async def bind_customer(
    conn: asyncpg.Connection,
    call: ToolCall,
    authenticating: Mapping[str, str],
    result: Mapping[str, Any],
    customer: str,
) -> str:
    """Bind the customer ``call``'s result names, if its tool authenticates; returns the
    conversation's customer after it (``customer`` if nothing was bound). In the call's
    transaction ``conn``, before its own audit record."""
    field = authenticating.get(call.tool)
    if field is None or "error" in result:
        return customer
    named = result.get(field)
    if not isinstance(named, str) or not named.strip() or len(named) > _MAX_CUSTOMER_CHARS:
        return customer  # the tool found nobody: nothing to bind
    if named == customer:
        return customer
    digest = digest_arguments(call.arguments)
    if customer:
        detail = f"{call.tool} named {named}, but the conversation's customer is {customer}: it never changes"
        logger.warning("conversation %s: %s", call.conversation, detail)
        await append_audit(conn, audit_entry(call, call.agent, customer, digest, BIND, "refused", detail))
        return customer
    bound = await conn.fetchval(_BIND, call.conversation, named)
    if bound is None:  # (a concurrent call bound it first: the conversation keeps that one)
        current = await conn.fetchval("SELECT customer FROM conversations WHERE id=$1", call.conversation)
        return await bind_customer(conn, call, authenticating, result, current or "")
    detail = f"customer {named} bound from the result of {call.tool} (field {field})"
    await append_audit(conn, audit_entry(call, call.agent, named, digest, BIND, "applied", detail))
    return named

"""The audit log: an append-only, hash-chained record of every decision, in PostgreSQL.

Contract:

* ``append_audit`` adds one record inside the caller's transaction, so the record commits or
  rolls back with the action it describes. Appends are serialized by a transaction-scoped
  advisory lock; ids are taken after the lock, so id order is chain order. The database
  does the append in one round trip (``corral_audit_append``, migration 0008), computing
  the same hash as ``chain_hash``.
* The table rejects ``UPDATE``, ``DELETE`` and ``TRUNCATE`` with a trigger
  ("audit_log is append-only"). Whoever owns the table can disable that trigger; the chain is
  what makes such changes visible: ``verify_audit`` (``corral audit verify``) recomputes every
  hash and reports the first record that does not match.

The chain. Each record stores ``prev_hash`` (the ``hash`` of the record before it, or 64 zeros
for the first record) and::

    hash = sha256(bytes.fromhex(prev_hash) + canonical(record)).hexdigest()

``canonical(record)`` is the UTF-8 encoding of a JSON object with exactly these keys, sorted,
with no whitespace (separators ``,`` and ``:``) and non-ASCII characters written as themselves
(``ensure_ascii=False``):

====================  ===============================================================================
``id``                integer
``created_at``        string, ISO-8601 in UTC with microseconds: ``2025-01-31T12:00:00.000000+00:00``
``agent``             string
``credential_id``     string
``on_behalf_of``      string
``conversation``      string
``action``            string
``arguments_digest``  string (see ``digest_arguments``)
``decision``          string
``policy_ids``        array of strings, in the order recorded
``approval_id``       string or ``null``
``outcome``           string
``detail``            string
====================  ===============================================================================

``prev_hash`` and ``hash`` themselves are not in the object; ``prev_hash`` enters through the
prefix. Gaps in ids are normal (an append whose transaction rolled back still used its id);
a missing record shows up as a ``prev_hash`` that does not match the record before it. A chain
alone cannot reveal that its newest records were removed, nor a chain rewritten from some
record on: the supervisor keeps signed anchors of it outside PostgreSQL (``supervisor.audit._anchors``),
and ``corral audit verify`` checks the chain against them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from corral.supervisor.errors import StoreError
from corral.supervisor.store._sql import Numbered, numbered
from corral.supervisor.store._unavailable import UNAVAILABLE, unavailable

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record."""

_CHAINED_FIELDS = (
    "id",
    "created_at",
    "agent",
    "credential_id",
    "on_behalf_of",
    "conversation",
    "action",
    "arguments_digest",
    "decision",
    "policy_ids",
    "approval_id",
    "outcome",
    "detail",
)

_COLUMNS = ", ".join((*_CHAINED_FIELDS, "prev_hash", "hash"))


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One decision to record: who acted, for whom, what was decided, and what came of it."""

    agent: str
    """Who acted: the agent's name (from its credentials), or the operator's for a rollback."""
    credential_id: str
    """The credential that proved it: ``agent-<name>`` (the agent's nkey identity), or
    ``admin``."""
    on_behalf_of: str
    """The customer or client the action was for."""
    conversation: str
    action: str
    """The tool called (``refund``), or the undo a rollback ran."""
    arguments_digest: str
    """``digest_arguments`` of the action's arguments; the arguments themselves are not kept."""
    decision: str
    """The verdict: Cedar's ``allow``, ``deny`` or ``approval``; ``stop`` (a kill, a budget,
    a cap); ``invalid``; ``error``; ``rollback``."""
    policy_ids: tuple[str, ...] = ()
    """The policies that produced the decision."""
    approval_id: str | None = None
    outcome: str
    """What came of it: ``applied``, ``failed: <why>``, ``denied``, ``stopped``,
    ``approval_required``, ``simulated`` (a dry run), ``invalid``."""
    detail: str = ""


@dataclass(frozen=True)
class AuditVerification:
    """The result of walking the chain."""

    count: int
    """Records found intact (all of them when ``first_broken`` is None)."""
    first_broken: int | None
    """The id of the first record that fails verification, or None when the chain is intact."""
    problem: str | None
    """Why that record fails, or None."""
    head: str | None = None
    """The hash of the last intact record (None for an empty log); record it elsewhere to detect
    the removal of the newest records, which no chain can show by itself."""
    anchors: int = 0
    """Signed anchors the chain was checked against (``supervisor.audit._anchors``)."""
    anchored: int = 0
    """Records confirmed by an anchor (the newest anchored count that matches)."""
    position: int | None = None
    """The 1-based position in the chain of the first bad record, when anchors found it."""

    @property
    def intact(self) -> bool:
        """True when every record verified."""
        return self.first_broken is None


def digest_arguments(arguments: Mapping[str, Any]) -> str:
    """The sha256 hex digest of ``arguments`` as canonical JSON.

    Canonical JSON here: keys sorted, no whitespace, non-ASCII characters as themselves, UTF-8.

    Raises:
        TypeError: if a value is not JSON-serializable.
    """
    return hashlib.sha256(_canonical_json(arguments)).hexdigest()


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers (see the module docstring for the encoding).

    Args:
        record: The record's fields; extra keys (``prev_hash``, ``hash``) are ignored.

    Raises:
        KeyError: if a chained field is missing.
        ValueError: if ``created_at`` has no time zone.
    """
    created_at: datetime = record["created_at"]
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    fields = {name: record[name] for name in _CHAINED_FIELDS}
    fields["created_at"] = created_at.astimezone(UTC).isoformat(timespec="microseconds")
    fields["policy_ids"] = list(record["policy_ids"])
    return _canonical_json(fields)


def chain_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """``sha256(bytes.fromhex(prev_hash) + canonical(record))`` as hex.

    Raises:
        ValueError: if ``prev_hash`` is not hex.
    """
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(record)).hexdigest()


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _fields(entry: AuditEntry) -> dict[str, Any]:
    return {**asdict(entry), "policy_ids": list(entry.policy_ids)}


def _pieces(fields: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """``canonical(record)`` around the two items only the database knows: everything
    before ``"created_at"``, between it and ``"id"``, and after ``"id"`` (each with the
    commas that join it to them); ``fields``: the record's, from ``_fields``."""
    groups: tuple[dict[str, Any], ...] = ({}, {}, {})
    for name in _CHAINED_FIELDS:
        if name not in ("created_at", "id"):
            groups[(name > "created_at") + (name > "id")][name] = fields[name]
    before, between, after = (_canonical_json(group)[1:-1] for group in groups)
    return b"{" + before + b",", b"," + between + b",", b"," + after + b"}"


_RECORDED_FIELDS = _CHAINED_FIELDS[2:]
"""What the caller gives a record (the database gives its id and time)."""
_APPEND_FIELDS = (*_RECORDED_FIELDS, "before_created_at", "between", "after_id")
APPEND_CALL = "corral_audit_append(" + ", ".join(f"$audit_{name}" for name in _APPEND_FIELDS) + ")"
"""The SQL expression appending a record, its parameters named ``$audit_*`` (the values of
``append_values``): for a statement that writes more than the record (as the tool gateway's
declared effect does). The caller's transaction must be as ``append_audit`` says."""


def append_values(entry: AuditEntry) -> dict[str, object]:
    """The parameters of ``APPEND_CALL``."""
    fields = _fields(entry)
    values = [*(fields[name] for name in _RECORDED_FIELDS), *_pieces(fields)]
    return {f"audit_{name}": value for name, value in zip(_APPEND_FIELDS, values, strict=True)}


@functools.cache
def _append_statement(along: str) -> Numbered:
    return numbered(f"WITH along AS ({along}) SELECT {APPEND_CALL}" if along else f"SELECT {APPEND_CALL}")


async def append_audit(
    conn: asyncpg.Connection,
    entry: AuditEntry,
    *,
    along: tuple[str, Mapping[str, object]] | None = None,
    witness: Callable[[int], None] | None = None,
) -> int:
    """Append ``entry`` to the chain, inside the caller's transaction, and return its id.

    One round trip: the database function ``corral_audit_append`` takes the chain's lock
    (held until the transaction ends, so concurrent appenders queue and each links to the
    record committed before it), reads the head, numbers and times the record, hashes it
    as ``chain_hash`` does and inserts it. The transaction must run at READ COMMITTED
    (PostgreSQL's default): a snapshot older than the lock would not see the head.

    Args:
        along: A data-modifying statement (``INSERT``/``UPDATE``) naming its parameters
            (``$name``: see ``store._sql``), and their values, run in the same statement:
            what the record describes, written in the same round trip.
        witness: Told the new record's id once it is appended (before the transaction
            commits): ``AuditAnchorer.witness``, so that anchors vouch for this process's
            records and a record appended by anyone else is named as forged.

    Raises:
        StoreError: if ``conn`` is not in a transaction or not at READ COMMITTED
            (``retryable=False``), if another appender extended the chain from the same head
            or ``along`` hit a row written concurrently (``retryable=True``), or if
            PostgreSQL fails.
    """
    if not conn.is_in_transaction():
        raise StoreError("append_audit must run inside a transaction", retryable=False)
    statement, values = along or ("", {})
    query = _append_statement(statement)
    arguments = query.values({**values, **append_values(entry)})
    try:
        record_id = int(await conn.fetchval(query.text, *arguments))
    except asyncpg.InvalidTransactionStateError as exc:
        raise StoreError(str(exc), retryable=False) from exc
    except asyncpg.UniqueViolationError as exc:
        # The chain's head or ``along``'s row was written concurrently: a retry reads it.
        raise StoreError(f"{exc.table_name} changed concurrently: {exc}", retryable=True) from exc
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot append to the audit log: {exc}", retryable=False) from exc
    if witness is not None:
        witness(record_id)
    return record_id


async def verify_audit(source: asyncpg.Connection | asyncpg.Pool) -> AuditVerification:
    """Walk the whole log in id order, recomputing every hash and checking every link.

    Rows are streamed with a cursor, so the table may be larger than memory. Unless ``source``
    is a connection already in a transaction, the walk runs in a read-only REPEATABLE READ transaction: one
    snapshot, so records appended meanwhile are neither half-seen nor reported.

    Args:
        source: A connection or a pool to take one from.

    Returns:
        The number of intact records and, if a record fails, its id and the reason: a
        ``prev_hash`` that is not the hash of the record before it (a record was removed or
        changed), or a ``hash`` that does not match the record's content (it was altered).

    Raises:
        StoreError: if PostgreSQL fails.
    """
    try:
        if isinstance(source, asyncpg.Pool):
            async with source.acquire() as conn:
                return await _verify(conn)
        return await _verify(source)
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot read the audit log: {exc}", retryable=False) from exc


async def walk_positions(
    source: asyncpg.Connection | asyncpg.Pool, visit: Callable[[int, int, str], None]
) -> AuditVerification:
    """``verify_audit``, calling ``visit(position, id, hash)`` for every intact record
    (positions from 1, in chain order), to compare the chain with its anchors.

    Raises:
        StoreError: if PostgreSQL fails.
    """
    try:
        if isinstance(source, asyncpg.Pool):
            async with source.acquire() as conn:
                return await _verify(conn, visit)
        return await _verify(source, visit)
    except UNAVAILABLE as exc:
        raise unavailable(exc) from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot read the audit log: {exc}", retryable=False) from exc


async def _verify(
    conn: asyncpg.Connection, visit: Callable[[int, int, str], None] | None = None
) -> AuditVerification:
    if conn.is_in_transaction():
        return await _walk(conn, visit)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _walk(conn, visit)


async def _walk(conn: asyncpg.Connection, visit: Callable[[int, int, str], None] | None) -> AuditVerification:
    count = 0
    prev_id: int | None = None
    prev_hash = GENESIS_HASH
    async for row in conn.cursor(f"SELECT {_COLUMNS} FROM audit_log ORDER BY id", prefetch=1000):
        record = dict(row)
        problem: str | None = None
        # The link first: once it matches, prev_hash is a hash this walk already trusts.
        if record["prev_hash"] != prev_hash:
            problem = (
                "prev_hash is not the genesis hash: records before it are missing"
                if prev_id is None
                else f"prev_hash does not match record {prev_id}: a record between them is missing"
                " or was altered"
            )
        elif chain_hash(prev_hash, record) != record["hash"]:
            problem = "hash mismatch: row was altered"
        if problem is not None:
            return AuditVerification(count, record["id"], problem, prev_hash if prev_id is not None else None)
        count += 1
        prev_id, prev_hash = record["id"], record["hash"]
        if visit is not None:
            visit(count, record["id"], record["hash"])
    return AuditVerification(count, None, None, prev_hash if prev_id is not None else None)

"""Anchors of the audit chain outside PostgreSQL: signed ``(count, head hash)`` on JetStream.

A hash chain shows a record that was changed, but not a chain that was rewritten from that
record on, nor its newest records removed: whoever controls the database can recompute it.
So the supervisor signs what the chain is, with a key the database never holds (its NATS
nkey, Ed25519), and publishes it to a file-backed stream, ``CORRAL_AUDIT``:

* ``AuditAnchorer`` signs ``(count, head id, head hash)`` when it starts, every
  ``audit.anchor_interval_s`` when the chain grew, and when it stops (after every service
  that appends has stopped). Counts are its own: each anchor adds the records appended
  after the head it anchored before, so records removed later are never counted again.
* ``check_anchored`` (``corral audit verify``) recomputes the chain and compares it with
  anchors whose signature verifies against the supervisor's public key (taken from the
  operator's side, never from the anchor). It names the first bad record:

  - the chain's hash at an anchored count differs from the anchor's: the records after
    the last matching anchor were rewritten, or forged records were inserted;
  - fewer records than the newest anchor counted: the newest records were removed;
  - records appended while no supervisor ran (after the shutdown anchor of the last one
    running, before the next one started): forged.

What anchors cannot show: a record appended through ``corral_audit_append`` while a
supervisor runs is anchored like any other. The supervisor's role may append only through
that function (migration 0012), so this takes the database's owner or a superuser.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

import asyncpg
import msgspec
import nacl.exceptions
import nacl.signing
import nkeys
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from supervisor._audit import GENESIS_HASH, AuditVerification, walk_positions
from supervisor.errors import StoreError

logger = logging.getLogger(__name__)

ANCHOR_STREAM = "CORRAL_AUDIT"
"""The file-backed stream holding the anchors."""
ANCHOR_SUBJECT = "corral.audit.anchor"
"""Where the supervisor publishes them (its identity may publish ``corral.audit.>``)."""

AnchorReason = Literal["start", "interval", "shutdown"]

_SIGNED_PREFIX = b"corral-audit-anchor/1\n"


class AuditAnchor(msgspec.Struct, frozen=True, kw_only=True, tag="audit.anchor"):
    """One signed statement of what the audit chain was."""

    v: int = 1
    count: int
    """Records in the chain, as the anchorer counted them."""
    head_id: int | None
    """The id of the newest record (None for an empty chain)."""
    head: str
    """Its hash (the genesis hash for an empty chain)."""
    at: str
    """When, ISO-8601 UTC."""
    reason: AnchorReason
    instance: str
    """One anchorer's run: its start and shutdown anchors bound when it appended."""
    public_key: str
    """The signer's nkey (checked against the key the verifier trusts, not trusted itself)."""
    signature: str = ""
    """Ed25519 over ``signed_bytes``, base64."""


def signed_bytes(anchor: AuditAnchor) -> bytes:
    """What an anchor's signature covers: every field but the signature, as JSON."""
    return _SIGNED_PREFIX + msgspec.json.encode(msgspec.structs.replace(anchor, signature=""))


_decoder = msgspec.json.Decoder(AuditAnchor)


def public_key_of(seed_file: Path) -> str:
    """The nkey public key of the seed in ``seed_file``."""
    key: bytes = nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key
    return key.decode()


def signature_valid(anchor: AuditAnchor, trusted_keys: Iterable[str]) -> bool:
    """Whether ``anchor`` is signed by one of ``trusted_keys`` (nkey public keys)."""
    if anchor.public_key not in set(trusted_keys):
        return False
    try:
        raw = base64.b32decode(anchor.public_key + "=" * (-len(anchor.public_key) % 8))
        key = nacl.signing.VerifyKey(raw[1:33])
        key.verify(signed_bytes(anchor), base64.b64decode(anchor.signature, validate=True))
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
        return False
    return True


async def ensure_anchor_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create ``CORRAL_AUDIT`` (file storage, nothing expires) if it does not exist."""
    try:
        await js.stream_info(ANCHOR_STREAM)
        return
    except NotFoundError:
        pass
    await js.add_stream(
        StreamConfig(
            name=ANCHOR_STREAM,
            subjects=[ANCHOR_SUBJECT],
            storage=StorageType.FILE,
            num_replicas=replicas,
            description="signed (count, head) of the audit chain",
        )
    )


async def read_anchors(js: JetStreamContext, trusted_keys: Iterable[str]) -> tuple[list[AuditAnchor], int]:
    """Every anchor in the stream, in publication order: (valid ones, how many are not).

    An anchor that does not decode or is not signed by a trusted key is left out and
    counted: someone who may publish to the stream tried to forge one.
    """
    keys = set(trusted_keys)
    try:
        info = await js.stream_info(ANCHOR_STREAM)
    except NotFoundError:
        return [], 0
    last = info.state.last_seq
    valid: list[AuditAnchor] = []
    invalid = 0
    if info.state.messages == 0:
        return valid, invalid
    sub = await js.subscribe(
        ANCHOR_SUBJECT, stream=ANCHOR_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            try:
                anchor = _decoder.decode(msg.data)
            except msgspec.DecodeError:
                invalid += 1
            else:
                if signature_valid(anchor, keys):
                    valid.append(anchor)
                else:
                    invalid += 1
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return valid, invalid


class AuditAnchorer:
    """Signs and publishes the chain's ``(count, head)``; ``async with`` it around the services
    that append, and run it as one of them.

    Entering publishes the ``start`` anchor (a full count), ``run()`` one per interval when the
    chain grew, leaving the ``shutdown`` anchor.

    Args:
        js: JetStream, as an identity that may publish ``corral.audit.anchor``.
        pool: The supervisor's database (its role may read ``audit_log``).
        seed_file: The supervisor's nkey seed; the key never leaves this process.
        interval_s: Seconds between anchors.
        replicas: Copies of ``CORRAL_AUDIT`` if this creates it (3 on a 3-node cluster).
    """

    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        seed_file: Path,
        *,
        interval_s: float = 10.0,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._pool = pool
        self._keys = nkeys.from_seed(bytearray(seed_file.read_bytes().strip()))
        self._public_key: str = self._keys.public_key.decode()
        self._interval_s = interval_s
        self._replicas = replicas
        self._instance = secrets.token_hex(8)
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last: AuditAnchor | None = None

    @property
    def public_key(self) -> str:
        """The key anchors are signed with."""
        return self._public_key

    @property
    def last(self) -> AuditAnchor | None:
        """The newest anchor published."""
        return self._last

    async def __aenter__(self) -> AuditAnchorer:
        await ensure_anchor_stream(self._js, replicas=self._replicas)
        await self.anchor("start")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        try:
            await self.anchor("shutdown")
        except Exception as error:  # the bus or the database is gone: the next start anchors
            logger.warning("no shutdown anchor of the audit log: %s", error)

    async def run(self) -> None:
        """Anchor every interval until ``shutdown()``."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.anchor("interval")
            except (StoreError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("cannot anchor the audit log now: %s", error)
            except Exception as error:
                logger.warning("cannot publish an audit anchor now: %s", error)

    async def shutdown(self) -> None:
        """Stop the interval anchors (the shutdown anchor comes when the block exits)."""
        self._stopping.set()

    async def anchor(self, reason: AnchorReason) -> AuditAnchor:
        """Sign and publish the chain as it is now; an interval anchor only if it grew."""
        async with self._lock:
            previous = self._last
            after = previous.head_id or 0 if previous is not None else 0
            row = await self._pool.fetchrow(
                "WITH new AS (SELECT id, hash FROM audit_log WHERE id > $1)"
                " SELECT (SELECT count(*) FROM new) AS n,"
                " (SELECT id FROM new ORDER BY id DESC LIMIT 1) AS head_id,"
                " (SELECT hash FROM new ORDER BY id DESC LIMIT 1) AS head",
                after,
            )
            assert row is not None
            if reason == "interval" and previous is not None and row["n"] == 0:
                return previous
            count = (previous.count if previous is not None else 0) + int(row["n"])
            head_id = row["head_id"] if row["n"] else (previous.head_id if previous else None)
            head = row["head"] if row["n"] else (previous.head if previous else GENESIS_HASH)
            unsigned = AuditAnchor(
                count=count,
                head_id=head_id,
                head=head,
                at=datetime.now(UTC).isoformat(timespec="microseconds"),
                reason=reason,
                instance=self._instance,
                public_key=self._public_key,
            )
            signature = base64.b64encode(self._keys.sign(signed_bytes(unsigned))).decode()
            anchor = msgspec.structs.replace(unsigned, signature=signature)
            await self._js.publish(ANCHOR_SUBJECT, msgspec.json.encode(anchor), stream=ANCHOR_STREAM)
            self._last = anchor
            logger.debug("audit anchor %s: %d records, head %s", reason, count, head)
            return anchor


@dataclass(frozen=True)
class _Finding:
    position: int
    """1-based position in the chain of the first bad record."""
    problem: str
    record_id: int | None = None


def check_anchored(
    walked: AuditVerification, positions: dict[int, tuple[int, str]], anchors: Sequence[AuditAnchor]
) -> AuditVerification:
    """Compare a walked chain with its anchors; the earliest problem wins.

    Args:
        walked: The walk of the chain (``walk_positions``): intact records, first break.
        positions: ``position -> (id, hash)`` for the positions the anchors ask about.
        anchors: Valid anchors, in publication order.
    """
    intact = walked.count
    findings: list[_Finding] = []
    if walked.first_broken is not None:
        findings.append(_Finding(intact + 1, walked.problem or "broken", walked.first_broken))
    matching = sorted({a.count for a in anchors if a.count <= intact and _at(positions, a.count) == a.head})
    for anchor in sorted(anchors, key=lambda a: a.count):
        if anchor.count > intact:
            continue
        if _at(positions, anchor.count) != anchor.head:
            before = max((c for c in matching if c < anchor.count), default=0)
            findings.append(
                _Finding(
                    before + 1,
                    f"rewritten: the chain at record {anchor.count} does not match the anchor signed at "
                    f"{anchor.at}; records after {_describe(positions, before)} were changed, removed "
                    "or forged and the chain recomputed",
                )
            )
            break
    total = intact if walked.first_broken is None else None
    newest = max(anchors, key=lambda a: a.count, default=None)
    if total is not None and newest is not None and newest.count > total:
        # The earliest missing record an anchor names: exact when anchors are dense.
        missing = min((a for a in anchors if a.count > total), key=lambda a: a.count)
        last = f"after record {positions[total][0]}" if total else "from the start"
        findings.append(
            _Finding(
                total + 1,
                f"truncated: the anchor signed at {newest.at} counted {newest.count} records, the log "
                f"holds {total}: the records {last} were deleted (record {missing.head_id} among them)",
                missing.head_id if missing.count == total + 1 else None,
            )
        )
    unattended = _unattended(anchors)
    if unattended is not None and total is not None:
        after, upto = unattended
        if (upto or total) > after and total > after:
            findings.append(
                _Finding(
                    after + 1,
                    f"forged: appended after every supervisor had stopped (the shutdown anchor counted "
                    f"{after} records)",
                )
            )
    if not findings:
        return AuditVerification(
            walked.count, None, None, walked.head, anchors=len(anchors), anchored=max(matching, default=0)
        )
    first = min(findings, key=lambda f: f.position)
    first_id = first.record_id
    if first_id is None and first.position in positions:
        first_id = positions[first.position][0]
    if first_id is None:
        # A deleted record no anchor names: the first one after the last record kept.
        first_id = (positions[first.position - 1][0] + 1) if first.position > 1 else 1
    return AuditVerification(
        min(walked.count, first.position - 1),
        first_id,
        first.problem,
        walked.head,
        anchors=len(anchors),
        anchored=max((c for c in matching if c < first.position), default=0),
        position=first.position,
    )


def anchored_positions(anchors: Sequence[AuditAnchor]) -> set[int]:
    """The chain positions ``check_anchored`` needs: each anchored count and the one after."""
    wanted = {1}
    for anchor in anchors:
        wanted.update((anchor.count, anchor.count + 1))
    return wanted


async def verify_anchored(
    source: asyncpg.Connection | asyncpg.Pool, anchors: Sequence[AuditAnchor]
) -> AuditVerification:
    """``verify_audit`` and then ``check_anchored``: the chain against its anchors.

    Raises:
        StoreError: if PostgreSQL fails.
    """
    walked, positions = await walk_positions(source, anchored_positions(anchors))
    return check_anchored(walked, positions, anchors)


def _at(positions: dict[int, tuple[int, str]], count: int) -> str:
    return GENESIS_HASH if count == 0 else positions.get(count, (0, ""))[1]


def _describe(positions: dict[int, tuple[int, str]], count: int) -> str:
    if count == 0:
        return "the start of the log"
    return f"record {positions[count][0]} (the last one an anchor confirms)"


def _unattended(anchors: Sequence[AuditAnchor]) -> tuple[int, int | None] | None:
    """The first stretch in which no anchorer ran: (count at the last shutdown, count at the
    next start, or None if none started again)."""
    live: set[str] = set()
    stopped_at: int | None = None
    for anchor in anchors:
        if stopped_at is not None:
            if anchor.count > stopped_at:
                return stopped_at, anchor.count
            stopped_at = None
        if anchor.reason == "shutdown":
            live.discard(anchor.instance)
            if not live:
                stopped_at = anchor.count
        else:
            live.add(anchor.instance)
    return (stopped_at, None) if stopped_at is not None else None


def trusted_keys_from(seed_files: Iterable[Path], extra: str = "") -> list[str]:
    """Public keys the verifier trusts: those of ``seed_files`` that exist, plus ``extra``
    (comma-separated nkeys, e.g. from ``CORRAL_AUDIT_PUBLIC_KEYS``)."""
    keys = [public_key_of(path) for path in seed_files if path.is_file()]
    keys += [k.strip() for k in extra.split(",") if k.strip()]
    return keys

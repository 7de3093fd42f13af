"""Anchors of the audit chain outside PostgreSQL: signed ``(count, head hash)`` on JetStream.

A hash chain shows a record that was changed, but not a chain that was rewritten from that
record on, nor its newest records removed: whoever controls the database can recompute it.
So the supervisor signs what the chain is, with a key the database never holds (its NATS
nkey, Ed25519), and publishes it to a file-backed stream, ``CORRAL_AUDIT``.

``AuditAnchorer`` signs ``(count, head id, head hash)`` when it starts, every
``audit.anchor_interval_s`` when the chain grew, and when it stops (after every service
that appends has stopped). Counts are its own: each anchor adds the records appended after
the head it anchored before, so records removed later are never counted again. With
``witnessing``, each anchor also lists the ids its process appended since the one before.

``supervisor.audit._anchor_check`` compares the chain with the anchors (``corral audit verify``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
from collections.abc import Iterable
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

from corral.supervisor.audit._audit import GENESIS_HASH
from corral.supervisor.errors import StoreError

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
    witnessing: bool = False
    """Whether every record its process appends is witnessed (``AuditAnchorer.witness``)."""
    witnessed: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """The ids its process appended since its previous anchor, as inclusive ranges."""
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
        witnessing: Every append of this process is reported to ``witness`` (pass it as
            ``append_audit(..., witness=anchorer.witness)``): anchors then list the ids this
            process appended, and a record appended by anyone else while it ran is named
            as forged. Give every appending process its own anchorer before turning it on.
    """

    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        seed_file: Path,
        *,
        interval_s: float = 10.0,
        replicas: int = 1,
        witnessing: bool = False,
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
        self._witnessing = witnessing
        self._witnessed: list[int] = []

    def witness(self, record_id: int) -> None:
        """Note that this process appended ``record_id`` (before its transaction commits)."""
        self._witnessed.append(record_id)

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
            # Taken after the read: a record it counted was witnessed before it committed.
            witnessed, self._witnessed = self._witnessed, []
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
                witnessing=self._witnessing,
                witnessed=id_ranges(witnessed),
            )
            signature = base64.b64encode(self._keys.sign(signed_bytes(unsigned))).decode()
            anchor = msgspec.structs.replace(unsigned, signature=signature)
            await self._js.publish(ANCHOR_SUBJECT, msgspec.json.encode(anchor), stream=ANCHOR_STREAM)
            self._last = anchor
            logger.debug("audit anchor %s: %d records, head %s", reason, count, head)
            return anchor


def id_ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive ranges: ``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]``."""
    ranges: list[tuple[int, int]] = []
    for record_id in sorted(set(ids)):
        if ranges and ranges[-1][1] == record_id - 1:
            ranges[-1] = (ranges[-1][0], record_id)
        else:
            ranges.append((record_id, record_id))
    return ranges


def trusted_keys_from(seed_files: Iterable[Path], extra: str = "") -> list[str]:
    """Public keys the verifier trusts: those of ``seed_files`` that exist, plus ``extra``
    (comma-separated nkeys, e.g. from ``CORRAL_AUDIT_PUBLIC_KEYS``)."""
    keys = [public_key_of(path) for path in seed_files if path.is_file()]
    keys += [k.strip() for k in extra.split(",") if k.strip()]
    return keys

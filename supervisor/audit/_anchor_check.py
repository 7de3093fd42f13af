"""Checking the audit chain against its signed anchors (``corral audit verify``).

The chain is walked once (``walk_positions``: every hash and link recomputed); then the
anchors, whose signatures were verified against the supervisor's key, are compared with it.
The earliest problem wins, and names the first bad record:

* a break in the chain itself (a record altered without recomputing the rest);
* **rewritten**: the chain's hash at an anchored count differs from the anchor's: the
  first record after the last anchor that still matches is named;
* **truncated**: fewer records than an anchor counted;
* **forged**, appended while no anchorer ran: after the shutdown anchor of the last one
  running, before the next one started;
* **forged**, appended while an anchorer that witnesses its process's appends ran, and
  witnessed by none (``AuditAnchorer(witnessing=True)``). A record an anchorer's process
  may have appended just before it died unannounced (after its last anchor, before the
  next anchorer started) is given the benefit of the doubt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from corral.supervisor.audit._anchors import AuditAnchor
from corral.supervisor.audit._audit import GENESIS_HASH, AuditVerification, walk_positions

_UNBOUNDED = 2**63


@dataclass(frozen=True)
class _Finding:
    position: int
    """1-based position in the chain of the first bad record."""
    problem: str
    record_id: int | None = None


@dataclass
class _Instance:
    """What one anchorer's anchors say about when it ran."""

    start: int
    last: int
    witnessing: bool
    shutdown: bool = False
    superseded_at: int | None = None
    """The count at the first start of another anchorer after its last anchor."""


@dataclass
class _Witnesses:
    """Who ran when, and which ids they appended."""

    instances: dict[str, _Instance] = field(default_factory=dict)
    ids: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, anchors: Sequence[AuditAnchor]) -> _Witnesses:
        out = cls()
        for anchor in anchors:
            if anchor.reason == "start":
                for name, other in out.instances.items():
                    if name != anchor.instance and not other.shutdown and other.superseded_at is None:
                        other.superseded_at = anchor.count
            instance = out.instances.get(anchor.instance)
            if instance is None:
                instance = out.instances[anchor.instance] = _Instance(
                    start=anchor.count, last=anchor.count, witnessing=anchor.witnessing
                )
            instance.last = max(instance.last, anchor.count)
            instance.superseded_at = None
            instance.shutdown = instance.shutdown or anchor.reason == "shutdown"
            for first, last in anchor.witnessed:
                out.ids.update(range(first, last + 1))
        return out

    @property
    def active(self) -> bool:
        return any(i.witnessing for i in self.instances.values())

    def forged(self, position: int, record_id: int) -> bool:
        """Whether the record at ``position`` should have been witnessed and was not."""
        if record_id in self.ids:
            return False
        checked = any(i.witnessing and i.start < position <= i.last for i in self.instances.values())
        return checked and not any(self._excuses(i, position) for i in self.instances.values())

    @staticmethod
    def _excuses(instance: _Instance, position: int) -> bool:
        """Whether ``instance`` may have appended ``position`` without witnessing it."""
        end = instance.last if instance.shutdown else (instance.superseded_at or _UNBOUNDED)
        if not instance.witnessing:
            return instance.start < position <= end
        # A witnessing anchorer that stopped unannounced: its last appends went unanchored.
        return not instance.shutdown and instance.last < position <= end


async def verify_anchored(
    source: asyncpg.Connection | asyncpg.Pool, anchors: Sequence[AuditAnchor]
) -> AuditVerification:
    """Walk the chain (as ``verify_audit``) and check it against ``anchors`` (valid ones, in
    publication order).

    Raises:
        StoreError: if PostgreSQL fails.
    """
    wanted = anchored_positions(anchors)
    positions: dict[int, tuple[int, str]] = {}
    witnesses = _Witnesses.of(anchors)
    unwitnessed: list[tuple[int, int]] = []

    def visit(position: int, record_id: int, record_hash: str) -> None:
        if position in wanted:
            positions[position] = (record_id, record_hash)
        if witnesses.active and not unwitnessed and witnesses.forged(position, record_id):
            unwitnessed.append((position, record_id))

    walked = await walk_positions(source, visit)
    return check_anchored(walked, positions, anchors, unwitnessed[0] if unwitnessed else None)


def anchored_positions(anchors: Sequence[AuditAnchor]) -> set[int]:
    """The chain positions ``check_anchored`` needs: each anchored count and the one after."""
    wanted = {1}
    for anchor in anchors:
        wanted.update((anchor.count, anchor.count + 1))
    return wanted


def check_anchored(
    walked: AuditVerification,
    positions: dict[int, tuple[int, str]],
    anchors: Sequence[AuditAnchor],
    unwitnessed: tuple[int, int] | None = None,
) -> AuditVerification:
    """Compare a walked chain with its anchors; the earliest problem wins.

    Args:
        walked: The walk of the chain: intact records, first break.
        positions: ``position -> (id, hash)`` for ``anchored_positions(anchors)``.
        anchors: Valid anchors, in publication order.
        unwitnessed: The first (position, id) no witnessing anchorer vouches for, if any.
    """
    intact = walked.count
    findings: list[_Finding] = []
    if walked.first_broken is not None:
        findings.append(_Finding(intact + 1, walked.problem or "broken", walked.first_broken))
    matching = sorted({a.count for a in anchors if a.count <= intact and _at(positions, a.count) == a.head})
    findings.extend(_rewritten(positions, anchors, intact, matching))
    total = intact if walked.first_broken is None else None
    if total is not None:
        findings.extend(_truncated(positions, anchors, total))
    unattended = _unattended(anchors)
    if unattended is not None and total is not None:
        after, upto = unattended
        if (upto or total) > after and total > after:
            findings.append(
                _Finding(
                    after + 1,
                    "forged: appended after every supervisor had stopped (the shutdown anchor "
                    f"counted {after} records)",
                )
            )
    if unwitnessed is not None:
        findings.append(
            _Finding(
                unwitnessed[0],
                "forged: appended while the supervisor ran, but not by it (no anchor witnessed it)",
                unwitnessed[1],
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


def _rewritten(
    positions: dict[int, tuple[int, str]], anchors: Sequence[AuditAnchor], intact: int, matching: list[int]
) -> list[_Finding]:
    """The earliest anchor within the intact chain that the chain does not match."""
    for anchor in sorted(anchors, key=lambda a: a.count):
        if anchor.count <= intact and _at(positions, anchor.count) != anchor.head:
            before = max((c for c in matching if c < anchor.count), default=0)
            return [
                _Finding(
                    before + 1,
                    f"rewritten: the chain at record {anchor.count} does not match the anchor signed at "
                    f"{anchor.at}; records after {_describe(positions, before)} were changed, removed "
                    "or forged and the chain recomputed",
                )
            ]
    return []


def _truncated(
    positions: dict[int, tuple[int, str]], anchors: Sequence[AuditAnchor], total: int
) -> list[_Finding]:
    """An anchor that counted more records than the (intact) chain holds."""
    newest = max(anchors, key=lambda a: a.count, default=None)
    if newest is None or newest.count <= total:
        return []
    # The earliest missing record an anchor names: exact when anchors are dense.
    missing = min((a for a in anchors if a.count > total), key=lambda a: a.count)
    last = f"after record {positions[total][0]}" if total else "from the start"
    return [
        _Finding(
            total + 1,
            f"truncated: the anchor signed at {newest.at} counted {newest.count} records, the log "
            f"holds {total}: the records {last} were deleted (record {missing.head_id} among them)",
            missing.head_id if missing.count == total + 1 else None,
        )
    ]


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

"""A conversation's trace, read from corral's span store: its spans as a tree (what
``corral trace`` prints and the console draws)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

_SPANS = """
SELECT span_id, parent_id, name, kind, service, started_at, ended_at, status, status_message,
       attributes::text AS attributes
FROM spans WHERE conversation = $1 ORDER BY started_at, span_id
"""


@dataclass
class SpanNode:
    """One stored span and the spans under it."""

    span_id: str
    parent_id: str
    name: str
    service: str
    started_at: datetime
    duration_ms: float
    status: str
    status_message: str
    attributes: dict[str, Any]
    children: list[SpanNode] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        """The node as JSON data (``corral trace --json``)."""
        return {
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "name": self.name,
            "service": self.service,
            "started_at": self.started_at.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
            "status": self.status,
            "status_message": self.status_message,
            "attributes": self.attributes,
            "children": [child.document() for child in self.children],
        }


async def conversation_trace(conn: asyncpg.Connection, conversation: str) -> list[SpanNode]:
    """The conversation's spans as trees, roots first in time (a span whose parent is not
    stored, a collector's or one past the retention, is a root)."""
    nodes: dict[str, SpanNode] = {}
    for row in await conn.fetch(_SPANS, conversation):
        nodes[row["span_id"]] = SpanNode(
            span_id=row["span_id"],
            parent_id=row["parent_id"],
            name=row["name"],
            service=row["service"],
            started_at=row["started_at"],
            duration_ms=(row["ended_at"] - row["started_at"]).total_seconds() * 1000,
            status=row["status"],
            status_message=row["status_message"],
            attributes=json.loads(row["attributes"]),
        )
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.parent_id)
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent.children.append(node)
    return roots

"""The span writer on a real JetStream and PostgreSQL: span messages fetched together are
stored together, and one that PostgreSQL refuses (a NUL in a text) or that names a
conversation no index could hold is dead-lettered or stored without it, on its own, while
the others of its batch are stored at once."""

from __future__ import annotations

import secrets
from datetime import timedelta

from corral.bus import DEAD_REASON, BusConfig, connect, ensure_topology, subjects
from corral.bus._telemetry import SpanRecord
from corral.supervisor.stack._embedded import EmbeddedNats
from corral.supervisor.store._spans import SpanWriter
from corral.supervisor.store._store import Store
from tests.span_records import span_message, span_record


def _span(span_id: str, **changes: object) -> SpanRecord:
    return span_record(span_id, **{"attributes": {"gen_ai.conversation.id": "c-1"}, **changes})


async def test_a_refused_message_costs_only_itself_and_the_rest_of_its_batch_is_stored(
    nats_server: EmbeddedNats, database_url: str
) -> None:
    bus = await connect(BusConfig(servers=[nats_server.url], reconnect_forever=False))
    store = await Store.open(database_url)
    try:
        await ensure_topology(bus.js, [])
        sent = [
            _span("00000000000000a1"),
            _span("00000000000000a2", name="invoke_agent \x00"),
            # Past what a btree entry holds, and not compressible to fit.
            _span("00000000000000a3", attributes={"gen_ai.conversation.id": secrets.token_urlsafe(4000)}),
        ]
        for span in sent:
            await bus.js.publish(subjects.spans("agent-triage"), span_message(span))
        # Nested past what a decoder follows: it does not decode (RecursionError), and is
        # dead-lettered; it must not stop the writer.
        deep = span_message(_span("00000000000000a4"))
        deep = deep.replace(
            b'{"gen_ai.conversation.id"', b'{"x":' + b"[" * 5000 + b"]" * 5000 + b',"gen_ai.conversation.id"'
        )
        await bus.js.publish(subjects.spans("agent-triage"), deep)
        sub = await bus.js.pull_subscribe(subjects.all_spans(), durable="test", stream=subjects.SPANS_STREAM)
        msgs = await sub.fetch(batch=4, timeout=5)
        assert len(msgs) == 4  # one batch, as the writer fetches it
        writer = SpanWriter(bus.js, store.pool, retention=timedelta(hours=1))
        await writer._store(msgs)
        rows = await store.pool.fetch("SELECT span_id, conversation, service FROM spans ORDER BY span_id")
        assert [(r["span_id"], r["conversation"], r["service"]) for r in rows] == [
            ("00000000000000a1", "c-1", "agent-triage"),
            ("00000000000000a3", "", "agent-triage"),  # no such conversation: not in its index
        ]
        info = await bus.js.stream_info(subjects.DEAD_LETTER_STREAM)
        reasons = [
            ((await bus.js.get_msg(subjects.DEAD_LETTER_STREAM, seq)).headers or {})[DEAD_REASON]
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
        assert sorted(reason.split(":")[0] for reason in reasons) == ["cannot be stored", "decode error"]
        assert writer.stored == 2
    finally:
        await store.close()
        await bus.close()

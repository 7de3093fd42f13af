"""Streams and durable consumers: created if missing, updated if they drifted.

``CORRAL_WORK`` is a work queue: each message is removed once its one consumer acks it.
Consumers on it must have disjoint filters, which the subject layout guarantees (the
supervisor reads client starts and approval decisions; each agent reads its own inbox).
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from corral.bus import subjects
from corral.bus._config import TopologyConfig
from corral.bus._control import ensure_control_bucket
from corral.bus.errors import BusError


def _streams(config: TopologyConfig) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[
                subjects.all_conversation_starts(),
                subjects.all_agent_inboxes(),
                subjects.approval_decisions(),
            ],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            duplicate_window=config.duplicate_window_s,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            # Outcomes for clients, and alerts. Agents' step events and conversations'
            # progress are live only (traces, the UI, a watching client): the supervisor
            # records every step in PostgreSQL, so storing them too would cost a write each.
            subjects=[subjects.all_conversation_outcomes(), subjects.alerts()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.events_max_age_s,
            duplicate_window=config.duplicate_window_s,
        ),
        StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=subjects.all_dead_letters(),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.dead_letter_max_age_s,
            max_bytes=config.dead_letter_max_bytes,
            max_msg_size=config.dead_letter_max_msg_bytes,
        ),
        StreamConfig(
            # Spans on their way to PostgreSQL (the supervisor's SpanWriter): a buffer, not
            # the store; its retention is the telemetry section's.
            name=subjects.SPANS_STREAM,
            subjects=[subjects.all_spans()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.spans_max_age_s,
            max_bytes=config.spans_max_bytes,
        ),
    ]


def _consumer(config: TopologyConfig, durable: str, filters: list[str]) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        max_deliver=config.max_deliver,
        max_ack_pending=config.max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


def supervisor_consumer_config(config: TopologyConfig) -> ConsumerConfig:
    """The supervisor's durable consumer: client starts and approval decisions. (Agents
    hand their outputs over as requests, which the supervisor answers once it has committed
    them: see ``supervisor.OutputDesk``.)"""
    return _consumer(
        config,
        subjects.SUPERVISOR_CONSUMER,
        [subjects.all_conversation_starts(), subjects.approval_decisions()],
    )


def agent_consumer_config(config: TopologyConfig, agent: str) -> ConsumerConfig:
    """An agent's durable inbox consumer, shared by all its replicas."""
    return _consumer(config, subjects.agent_consumer(agent), [subjects.agent_inbox(agent)])


async def ensure_topology(
    js: JetStreamContext, agents: Iterable[str], config: TopologyConfig | None = None
) -> None:
    """Create or update every stream, the supervisor's consumer and each agent's consumer.

    Idempotent; safe to run from several processes at once.

    Raises:
        BusError: if JetStream refuses a stream or consumer.
    """
    config = config or TopologyConfig()
    try:
        for stream in _streams(config):
            try:
                await js.stream_info(stream.name or "")
            except NotFoundError:
                await js.add_stream(stream)
            else:
                await js.update_stream(stream)
        await js.add_consumer(subjects.WORK_STREAM, supervisor_consumer_config(config))
        for agent in agents:
            await js.add_consumer(subjects.WORK_STREAM, agent_consumer_config(config, agent))
        await ensure_control_bucket(js, config.replicas)
    except NotFoundError as exc:
        raise BusError(f"JetStream is not enabled on this server: {exc}") from exc
    except Exception as exc:
        if isinstance(exc, BusError):
            raise
        raise BusError(f"cannot set up streams and consumers: {exc}") from exc

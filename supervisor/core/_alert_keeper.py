"""The alert keeper: every alert on ``corral.alerts``, whoever raised it (the supervisor's
anomaly watch and its dead-letter watcher, the model gateway), stored once in the
``alerts`` table for the console and ``corral status``, from a durable consumer on
``CORRAL_EVENTS``: an alert raised while the supervisor was away is stored when it is back.

An alert of a kind the config names in ``alerts.auto_kill`` kills the agent it names first,
through the operators' own kill (``_switches.flip_switch``: the gateway refuses the agent's
calls, the launcher revokes its identity, and the kill is in the audit chain, by
``corral-alerts``); the stored alert says what was done.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import asyncpg
import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, DeliverPolicy
from nats.js.api import ConsumerConfig as JsConsumerConfig

from corral.bus import Alert, Consumer, ConsumerConfig, Delivery, SwitchRequest, subjects
from corral.supervisor.config._sections import AlertsSection
from corral.supervisor.core._switches import flip_switch

logger = logging.getLogger(__name__)

KEEPER = "alert-keeper"
"""The durable consumer's name."""
AUTO_KILLER = "corral-alerts"
"""Who an automatic kill is by, in the audit chain and on the kill switch."""
_MAX_DELIVER = 10

_STORED = "SELECT 1 FROM alerts WHERE stream_seq = $1"
_INSERT = """
INSERT INTO alerts (kind, agent, conversation, model, reason, action, stream_seq, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8::float8 > 0 THEN to_timestamp($8) ELSE now() END)
ON CONFLICT (stream_seq) DO NOTHING
"""


class AlertKeeper(Consumer[Alert]):
    """Store each alert once; kill its agent first when the config says so."""

    def __init__(
        self, js: JetStreamContext, pool: asyncpg.Pool, section: AlertsSection, agents: Collection[str]
    ) -> None:
        super().__init__(
            js,
            ConsumerConfig(
                stream=subjects.EVENTS_STREAM, durable=KEEPER, max_in_flight=1, max_deliver=_MAX_DELIVER
            ),
            msgspec.json.Decoder(Alert),
            self._keep,
        )
        self._pool = pool
        self._auto_kill = frozenset(section.auto_kill)
        self._agents = frozenset(agents)
        self.kept = 0

    async def _serve(self) -> None:
        # Alerts from now on the first time; from where it stopped after that.
        await self._js.add_consumer(
            subjects.EVENTS_STREAM,
            JsConsumerConfig(
                durable_name=KEEPER,
                filter_subject=subjects.alerts(),
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_deliver=_MAX_DELIVER,
            ),
        )
        await super()._serve()

    async def _keep(self, alert: Alert, delivery: Delivery) -> None:
        seq = delivery.msg.metadata.sequence.stream
        if await self._pool.fetchval(_STORED, seq):
            return  # stored (and acted on) before a redelivery
        action = await self._act(alert)
        await self._pool.execute(
            _INSERT,
            alert.kind,
            alert.agent,
            alert.conversation,
            alert.model,
            alert.reason,
            action,
            seq,
            alert.at,
        )
        self.kept += 1

    async def _act(self, alert: Alert) -> str:
        if alert.kind not in self._auto_kill or not alert.agent:
            return ""
        answer = await flip_switch(
            self._pool,
            self._js,
            SwitchRequest(
                target="agent",
                name=alert.agent,
                by=AUTO_KILLER,
                reason=f"auto-kill on {alert.kind}: {alert.reason}",
            ),
            self._agents,
        )
        if answer.status != "ok":
            logger.warning("could not kill %s on alert %s: %s", alert.agent, alert.kind, answer.reason)
            return f"kill refused: {answer.reason}"
        logger.warning("killed %s on alert %s", alert.agent, alert.kind)
        return f"killed {alert.agent}"

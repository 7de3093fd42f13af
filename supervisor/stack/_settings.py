"""The composition root: ``corral.yaml`` plus the environment, read once into ``Settings``.

Every command and the launcher start from one ``Settings.load(...)``: it reads the file,
then every environment variable corral knows, once, and hands out what the services are
built from (the graph, the budgets, the gateway's config, the stream topology, each agent's
settings, the URLs and the identities' seeds). Nothing below it reads the environment::

    CORRAL_STATE_DIR                 state_dir          (else ``state_dir``)
    NATS_URL                         nats_url           (else ``nats.url``)
    DATABASE_URL                     database_url       (else ``database.url``)
    CORRAL_SUPERVISOR_DATABASE_URL   supervisor_database_url (else ``database.supervisor_url``)
    CORRAL_NATS_MONITOR_PORT         monitor_port       (else ``nats.monitor_port``; empty: off)
    CORRAL_API_PORT                  api_port           (else ``api.port``; 0: a free one)
    CORRAL_STREAM_REPLICAS           topology.replicas  (else ``nats.stream_replicas``)
    CORRAL_CREDS                     credentials_for()  (else ``<state_dir>/creds/<identity>.nk``)
    CORRAL_DATABASE_PREPARED         database_prepared  (set by ``corral up`` for its services)
    CORRAL_AUDIT_PUBLIC_KEYS         audit_public_keys
    CORRAL_SUPERVISOR_PASSWORD       supervisor_password (``corral migrate``)
    models.<tier>.api_key_env        tier()'s ``api_key``

An empty variable counts as unset, except ``CORRAL_NATS_MONITOR_PORT``, where empty turns
the monitoring endpoint off. A value that is not what the variable takes is a
``ConfigError`` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.bus import Limits, TopologyConfig
from corral.router import ModelTier
from corral.supervisor.config._config import (
    CorralConfig,
    LoadedConfig,
    load_config,
    load_tools,
    resolve_config_path,
)
from corral.supervisor.errors import ConfigError
from corral.supervisor.store._budgets import Budgets

if TYPE_CHECKING:
    from corral.agents import AgentSettings
    from corral.supervisor.core._graph import Graph
    from corral.supervisor.gateway._gateway import GatewayConfig

DATABASE_PREPARED_ENV = "CORRAL_DATABASE_PREPARED"
"""Set for the services ``corral up`` starts: their database is migrated and set up."""

ENVIRONMENT = "(environment)"
"""The ``path`` of a ``ConfigError`` about an environment variable."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one process runs with: the validated config and the environment, read once.

    Build it with ``Settings.load`` (or ``from_loaded``); the derived objects (``graph``,
    ``gateway_config``, ``tools``, ``agent_settings()``) are built from these fields on
    first use, so a process pays only for what it runs.
    """

    loaded: LoadedConfig
    state_dir: Path
    """Absolute: where embedded servers, logs, seeds and ``runtime.json`` live."""
    nats_url: str | None
    """The configured NATS URL(s); None: the embedded server (found in ``runtime.json``)."""
    database_url: str | None
    """The configured owner DSN; None: the embedded PostgreSQL."""
    supervisor_database_url: str | None
    """The DSN the supervisor and a separate gateway connect with, if configured."""
    monitor_port: int | None
    """The embedded nats-server's monitoring port (0: a free one; None: none)."""
    api_port: int
    """The port ``corral up`` runs the API on (0: a free one)."""
    topology: TopologyConfig
    limits: Limits
    budgets: Budgets
    creds_file: Path | None = None
    """``CORRAL_CREDS``: this process's own seed, given explicitly."""
    database_prepared: bool = False
    """The database is migrated and the tools' backend set up (the service runs no DDL)."""
    audit_public_keys: str = ""
    """Comma-separated nkeys whose anchors ``corral audit verify`` trusts."""
    supervisor_password: str | None = field(default=None, repr=False)
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The values of the variables the model tiers name in ``api_key_env``."""

    @classmethod
    def load(
        cls, config_option: str | None, environ: Mapping[str, str] | None = None, *, check_tools: bool = True
    ) -> Settings:
        """Load the config ``-c`` names (see ``resolve_config_path``) and read ``environ``.

        Args:
            config_option: The ``-c/--config`` value, if any.
            environ: The environment (default: this process's).
            check_tools: Import the tools module and check the agents' tools against it.

        Raises:
            ConfigError: the file is invalid, or a variable's value is (the message names it).
        """
        loaded = load_config(resolve_config_path(config_option), check_tools=check_tools)
        return cls.from_loaded(loaded, environ)

    @classmethod
    def from_loaded(cls, loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of an already loaded config, with ``environ`` (default: the process's).

        Raises:
            ConfigError: a variable's value is not what it takes.
        """
        env = dict(os.environ if environ is None else environ)
        config = loaded.config
        replicas = _int_variable(env, "CORRAL_STREAM_REPLICAS", low=1, high=5)
        api_port = _int_variable(env, "CORRAL_API_PORT", low=0, high=65535)
        key_names = {tier.api_key_env for tier in config.models.values() if tier.api_key_env}
        return cls(
            loaded=loaded,
            state_dir=Path(env.get("CORRAL_STATE_DIR") or config.state_dir).resolve(),
            nats_url=env.get("NATS_URL") or config.nats.url,
            database_url=env.get("DATABASE_URL") or config.database.url,
            supervisor_database_url=(
                env.get("CORRAL_SUPERVISOR_DATABASE_URL") or config.database.supervisor_url
            ),
            monitor_port=_monitor_port(env, config),
            api_port=config.api.port if api_port is None else api_port,
            topology=TopologyConfig(
                replicas=replicas if replicas is not None else config.nats.stream_replicas,
                ack_wait_s=config.nats.ack_wait_s,
                max_deliver=config.nats.max_deliver,
                dead_letter_max_bytes=config.limits.dead_letter_max_bytes,
                dead_letter_max_age_s=config.limits.dead_letter_max_age_s,
            ),
            limits=config.limits.to_limits(),
            budgets=Budgets.from_config(loaded),
            creds_file=Path(env["CORRAL_CREDS"]) if env.get("CORRAL_CREDS") else None,
            database_prepared=env.get(DATABASE_PREPARED_ENV) == "1",
            audit_public_keys=env.get("CORRAL_AUDIT_PUBLIC_KEYS", ""),
            supervisor_password=env.get("CORRAL_SUPERVISOR_PASSWORD") or None,
            api_keys={name: env[name] for name in key_names if name in env},
        )

    @property
    def config(self) -> CorralConfig:
        """The validated ``corral.yaml``."""
        return self.loaded.config

    @property
    def path(self) -> Path:
        """The config file."""
        return self.loaded.path

    @property
    def creds_dir(self) -> Path:
        """Where the identities' nkey seeds live."""
        return self.state_dir / "creds"

    def credentials_for(self, identity: str) -> Path | None:
        """This process's seed: ``CORRAL_CREDS`` if set, else ``<state_dir>/creds/<identity>.nk``
        if present (the server then requires identities), else None (an open server).

        The file is looked for on each call: ``corral up`` writes the seeds after it starts.
        """
        if self.creds_file is not None:
            return self.creds_file
        path = self.creds_dir / f"{identity}.nk"
        try:
            return path if path.exists() else None
        except PermissionError:
            return None  # an agent run as its own user cannot look into the state directory

    @cached_property
    def graph(self) -> Graph:
        """The handoff graph and the conversation limits the supervisor enforces."""
        from corral.supervisor.config._config import load_payloads
        from corral.supervisor.core._graph import Graph

        config = self.config
        graph = config.graph
        return Graph(
            entry=graph.entry,
            edges={source: self.loaded.targets(source) for source in graph.edges},
            min_confidence=graph.min_confidence,
            max_steps=config.conversation.max_steps,
            max_pingpong=config.conversation.max_pingpong,
            window_turns=config.conversation.window_turns,
            idle_timeout_s=config.conversation.idle_timeout_s,
            max_running_per_client=config.conversation.max_running_per_client,
            edge_confidence={
                (source, edge.to): edge.min_confidence
                for source in graph.edges
                for edge in graph.edge_list(source)
                if edge.min_confidence is not None
            },
            reply_confidence={
                name: agent.min_confidence
                for name, agent in config.agents.items()
                if agent.min_confidence is not None
            },
            payloads=load_payloads(config),
            escalate_to=graph.escalate_to,
        )

    @cached_property
    def tools(self) -> dict[str, Any]:
        """The team's tools by name (empty without a ``tools`` section)."""
        return load_tools(self.config)

    @cached_property
    def gateway_config(self) -> GatewayConfig:
        """The tool gateway's grants, caps, approval queue, deadline, budgets and limits.

        Raises:
            ConfigError: the config has no ``tools`` section.
        """
        from datetime import timedelta

        from corral.supervisor.gateway._gateway import GatewayConfig

        tools = self.config.tools
        if tools is None:
            raise ConfigError(f"{self.path} configures no tools", path=str(self.path), field="tools")
        agents = self.config.agents
        return GatewayConfig(
            budgets=self.budgets,
            approval_ttl=timedelta(seconds=tools.approval_ttl_s),
            max_pending_approvals=tools.max_pending_approvals,
            grants={name: frozenset(agent.tools) for name, agent in agents.items()},
            max_calls_per_step={name: agent.max_tool_calls for name, agent in agents.items()},
            call_timeout_s=tools.call_timeout_s,
            authenticating=dict(tools.authenticating),
            limits=self.limits,
        )

    def tier(self, agent: str) -> ModelTier:
        """The model tier ``agent`` calls, its API key taken from the environment read at load."""
        return self.loaded.tier(agent, self.api_keys)

    def model_tiers(self) -> dict[str, ModelTier]:
        """The model tiers some agent may call (its own, or one it escalates to), with API
        keys from the environment read at load: what the model gateway serves."""
        used = {tier for agent in self.loaded.agent_names for tier in self.loaded.tiers_of(agent)}
        return {
            name: self.loaded.model_tier(name, self.api_keys) for name in self.config.models if name in used
        }

    def tiers_of(self) -> dict[str, frozenset[str]]:
        """The tiers each agent may ask the model gateway for."""
        return {agent: frozenset(self.loaded.tiers_of(agent)) for agent in self.loaded.agent_names}

    def agent_settings(self, agent: str) -> AgentSettings:
        """What ``corral agent run AGENT`` runs with: its instructions, targets, offered tools
        (name, description, JSON Schema), heartbeat (a third of ``ack_wait_s``) and limits."""
        from corral.agents import AgentSettings, HandoffEdge

        section = self.config.agents[agent]
        offered = [
            {"name": name, "description": self.tools[name].description, "schema": self.tools[name].schema()}
            for name in section.tools
        ]
        graph = self.graph
        edges = [
            HandoffEdge(
                target=target,
                payload_schema=payload.model_json_schema()
                if (payload := graph.payloads.get((agent, target)))
                else None,
                min_confidence=graph.threshold(agent, target),
            )
            for target in self.loaded.targets(agent)
        ]
        tiers = self.loaded.tiers_of(agent)
        timeouts = [self.model_tiers()[tier] for tier in tiers]
        return AgentSettings(
            tools=offered,
            name=agent,
            instructions=self.loaded.instructions[agent],
            edges=edges,
            team=self.loaded.agent_names,
            tiers=tiers,
            reply_min_confidence=graph.threshold(agent, None),
            # The gateway's retries and fallbacks all fit in one model call's wait.
            model_timeout_s=max(
                (len(t.fallbacks) + 1) * (t.retries + 1) * (t.timeout_s + t.retry_backoff_s * 8) + 10.0
                for t in timeouts
            ),
            heartbeat_s=self.config.nats.ack_wait_s / 3,
            max_tool_calls=section.max_tool_calls,
            max_deliver=self.config.nats.max_deliver,
            limits=self.limits,
        )


def _int_variable(env: Mapping[str, str], name: str, *, low: int, high: int) -> int | None:
    """``env[name]`` as an integer in ``[low, high]``; None when unset or empty.

    Raises:
        ConfigError: naming the variable, when it holds anything else.
    """
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ConfigError(
            f"{name}={value!r}: expected an integer from {low} to {high}", path=ENVIRONMENT, field=name
        )
    return number


def _monitor_port(env: Mapping[str, str], config: CorralConfig) -> int | None:
    """``CORRAL_NATS_MONITOR_PORT`` if set (empty: off), else ``nats.monitor_port``."""
    if "CORRAL_NATS_MONITOR_PORT" not in env:
        return config.nats.monitor_port
    return _int_variable(env, "CORRAL_NATS_MONITOR_PORT", low=0, high=65535)

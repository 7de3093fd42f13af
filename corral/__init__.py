"""corral: a production runtime for teams of AI agents.

What users write against is here: the tool contract (``Tool``, ``SqlTool``, ``ToolInput``,
``Resource``, and what Cedar sees of a resource: ``EntityType``, ``EntityRef``), the client
(``connect`` with a ``BusConfig`` gives a ``Bus``; then
``start_conversation``, ``send_and_wait``), the config loader
(``load_config``) and the error tree (every error corral raises is a ``CorralError``). The rest lives in the
sub-packages: ``corral.bus`` (NATS, the wire types), ``corral.router`` (model calls),
``corral.agents`` (the agent service) and ``corral.supervisor`` (the control plane).

The names load when first used, so that importing ``corral.bus`` in an agent process does
not import the supervisor (PostgreSQL, Cedar) along with it.
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from corral.agents.errors import AgentError, DecisionError
    from corral.bus._connection import Bus, BusConfig, connect
    from corral.bus.errors import (
        BusConnectError,
        BusError,
        ConnectionClosedError,
        CorralError,
        PayloadTooLargeError,
        PoisonMessageError,
    )
    from corral.router.errors import RouterError, ScriptError
    from corral.supervisor.config._config import load_config
    from corral.supervisor.core._client import send_and_wait, start_conversation
    from corral.supervisor.errors import ConcurrentChange, ConfigError, LauncherError, StoreError
    from corral.supervisor.gateway._approvals import ApprovalError
    from corral.supervisor.gateway._policy import PolicyError
    from corral.supervisor.gateway._sql_tools import SqlTool
    from corral.supervisor.gateway._tools import EntityRef, EntityType, Resource, Tool, ToolInput

_WHERE = {
    "EntityRef": "corral.supervisor.gateway._tools",
    "EntityType": "corral.supervisor.gateway._tools",
    "Resource": "corral.supervisor.gateway._tools",
    "Tool": "corral.supervisor.gateway._tools",
    "SqlTool": "corral.supervisor.gateway._sql_tools",
    "ToolInput": "corral.supervisor.gateway._tools",
    "start_conversation": "corral.supervisor.core._client",
    "connect": "corral.bus._connection",
    "Bus": "corral.bus._connection",
    "BusConfig": "corral.bus._connection",
    "send_and_wait": "corral.supervisor.core._client",
    "load_config": "corral.supervisor.config._config",
    "CorralError": "corral.bus.errors",
    "BusError": "corral.bus.errors",
    "BusConnectError": "corral.bus.errors",
    "ConnectionClosedError": "corral.bus.errors",
    "PayloadTooLargeError": "corral.bus.errors",
    "PoisonMessageError": "corral.bus.errors",
    "RouterError": "corral.router.errors",
    "ScriptError": "corral.router.errors",
    "AgentError": "corral.agents.errors",
    "DecisionError": "corral.agents.errors",
    "ConfigError": "corral.supervisor.errors",
    "StoreError": "corral.supervisor.errors",
    "ConcurrentChange": "corral.supervisor.errors",
    "LauncherError": "corral.supervisor.errors",
    "PolicyError": "corral.supervisor.gateway._policy",
    "ApprovalError": "corral.supervisor.gateway._approvals",
}

__all__ = [
    "AgentError",
    "ApprovalError",
    "Bus",
    "BusConfig",
    "BusConnectError",
    "BusError",
    "ConcurrentChange",
    "ConfigError",
    "ConnectionClosedError",
    "CorralError",
    "DecisionError",
    "EntityRef",
    "EntityType",
    "LauncherError",
    "PayloadTooLargeError",
    "PoisonMessageError",
    "PolicyError",
    "Resource",
    "RouterError",
    "ScriptError",
    "SqlTool",
    "StoreError",
    "Tool",
    "ToolInput",
    "connect",
    "load_config",
    "send_and_wait",
    "start_conversation",
]


__getattr__, __dir__ = _lazy_exports(__name__, globals(), _WHERE)

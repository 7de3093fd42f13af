"""corral's control plane: the supervisor (``core``), its state in PostgreSQL (``store``),
the tool gateway (``gateway``), the audit chain (``audit``), a running stack (``stack``),
the configuration (``config``) and the command line (``cli``).

The names below load when first used: a tool author's ``from corral import Tool`` (which
lives in ``corral.supervisor.gateway``) loads neither Cedar nor the supervisor.
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from corral.supervisor.audit._audit import AuditEntry, AuditVerification, append_audit, verify_audit
    from corral.supervisor.config._config import CorralConfig, LoadedConfig, load_config, resolve_config_path
    from corral.supervisor.core._client import format_path, send_and_wait, start_conversation
    from corral.supervisor.core._graph import Graph
    from corral.supervisor.core._supervisor import Supervisor, SupervisorState
    from corral.supervisor.errors import ConfigError, LauncherError, StoreError
    from corral.supervisor.gateway._gateway import GatewayConfig, ToolGateway
    from corral.supervisor.gateway._policy import PolicyDecision, PolicyEngine, PolicyError, PolicyRequest
    from corral.supervisor.stack._embedded import EmbeddedNats, EmbeddedPostgres
    from corral.supervisor.stack._launcher import Launcher, LauncherConfig
    from corral.supervisor.stack._settings import Settings
    from corral.supervisor.store._store import ConversationRecord, StepRecord, Store

_WHERE = {
    "AuditEntry": "corral.supervisor.audit._audit",
    "AuditVerification": "corral.supervisor.audit._audit",
    "ConfigError": "corral.supervisor.errors",
    "ConversationRecord": "corral.supervisor.store._store",
    "CorralConfig": "corral.supervisor.config._config",
    "EmbeddedNats": "corral.supervisor.stack._embedded",
    "EmbeddedPostgres": "corral.supervisor.stack._embedded",
    "GatewayConfig": "corral.supervisor.gateway._gateway",
    "Graph": "corral.supervisor.core._graph",
    "Launcher": "corral.supervisor.stack._launcher",
    "LauncherConfig": "corral.supervisor.stack._launcher",
    "LauncherError": "corral.supervisor.errors",
    "LoadedConfig": "corral.supervisor.config._config",
    "PolicyDecision": "corral.supervisor.gateway._policy",
    "PolicyEngine": "corral.supervisor.gateway._policy",
    "PolicyError": "corral.supervisor.gateway._policy",
    "PolicyRequest": "corral.supervisor.gateway._policy",
    "StepRecord": "corral.supervisor.store._store",
    "Store": "corral.supervisor.store._store",
    "StoreError": "corral.supervisor.errors",
    "Supervisor": "corral.supervisor.core._supervisor",
    "SupervisorState": "corral.supervisor.core._supervisor",
    "Settings": "corral.supervisor.stack._settings",
    "ToolGateway": "corral.supervisor.gateway._gateway",
    "append_audit": "corral.supervisor.audit._audit",
    "format_path": "corral.supervisor.core._client",
    "load_config": "corral.supervisor.config._config",
    "resolve_config_path": "corral.supervisor.config._config",
    "send_and_wait": "corral.supervisor.core._client",
    "start_conversation": "corral.supervisor.core._client",
    "verify_audit": "corral.supervisor.audit._audit",
}

__all__ = [
    "AuditEntry",
    "AuditVerification",
    "ConfigError",
    "ConversationRecord",
    "CorralConfig",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "GatewayConfig",
    "Graph",
    "Launcher",
    "LauncherConfig",
    "LauncherError",
    "LoadedConfig",
    "PolicyDecision",
    "PolicyEngine",
    "PolicyError",
    "PolicyRequest",
    "Settings",
    "StepRecord",
    "Store",
    "StoreError",
    "Supervisor",
    "SupervisorState",
    "ToolGateway",
    "append_audit",
    "format_path",
    "load_config",
    "resolve_config_path",
    "send_and_wait",
    "start_conversation",
    "verify_audit",
]

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _WHERE)

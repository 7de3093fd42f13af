"""corral's control plane: the supervisor, its store, the launcher and the CLI."""

from corral.supervisor._audit import AuditEntry, AuditVerification, append_audit, verify_audit
from corral.supervisor._client import format_path, send_and_wait, start_conversation
from corral.supervisor._config import CorralConfig, LoadedConfig, load_config, resolve_config_path
from corral.supervisor._decide import Graph
from corral.supervisor._embedded import EmbeddedNats, EmbeddedPostgres
from corral.supervisor._gateway import GatewayConfig, ToolGateway
from corral.supervisor._launcher import Launcher, LauncherConfig
from corral.supervisor._policy import PolicyDecision, PolicyEngine, PolicyError, PolicyRequest
from corral.supervisor._store import ConversationRecord, StepRecord, Store
from corral.supervisor._supervisor import Supervisor, SupervisorState
from corral.supervisor.errors import ConfigError, LauncherError, StoreError

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

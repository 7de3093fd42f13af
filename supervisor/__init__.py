"""corral's control plane: the supervisor, its store, the launcher and the CLI."""

from supervisor._client import format_path, send_and_wait, start_conversation
from supervisor._config import CorralConfig, LoadedConfig, load_config, resolve_config_path
from supervisor._decide import Graph
from supervisor._embedded import EmbeddedNats, EmbeddedPostgres
from supervisor._launcher import Launcher, LauncherConfig
from supervisor._store import ConversationRecord, StepRecord, Store
from supervisor._supervisor import Supervisor, SupervisorState
from supervisor.errors import ConfigError, LauncherError, StoreError

__all__ = [
    "ConfigError",
    "ConversationRecord",
    "CorralConfig",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "Graph",
    "Launcher",
    "LauncherConfig",
    "LauncherError",
    "LoadedConfig",
    "StepRecord",
    "Store",
    "StoreError",
    "Supervisor",
    "SupervisorState",
    "format_path",
    "load_config",
    "resolve_config_path",
    "send_and_wait",
    "start_conversation",
]

"""corral's agent service: one process per agent, inbox in, decisions out."""

from corral.agents._service import AgentService
from corral.agents._settings import AgentSettings, AgentState, HandoffEdge
from corral.agents._turns import Reply, ToolUse, Transfer, Turn, offered_tools, read_turn
from corral.agents.errors import AgentError, DecisionError

__all__ = [
    "AgentError",
    "AgentService",
    "AgentSettings",
    "AgentState",
    "DecisionError",
    "HandoffEdge",
    "Reply",
    "ToolUse",
    "Transfer",
    "Turn",
    "offered_tools",
    "read_turn",
]

"""corral's agent service: one process per agent, inbox in, decisions out."""

from corral.agents._decision import (
    Decision,
    HandoffDecision,
    ReplyDecision,
    ToolDecision,
    parse_decision,
    response_format,
)
from corral.agents._service import AgentService, AgentSettings, AgentState
from corral.agents.errors import AgentError, DecisionError

__all__ = [
    "AgentError",
    "AgentService",
    "AgentSettings",
    "AgentState",
    "Decision",
    "DecisionError",
    "HandoffDecision",
    "ReplyDecision",
    "ToolDecision",
    "parse_decision",
    "response_format",
]

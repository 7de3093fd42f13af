"""corral's agent service: one process per agent, inbox in, decisions out."""

from agents._decision import (
    Decision,
    HandoffDecision,
    ReplyDecision,
    parse_decision,
    response_format,
)
from agents._service import AgentService, AgentSettings, AgentState
from agents.errors import AgentError, DecisionError

__all__ = [
    "AgentError",
    "AgentService",
    "AgentSettings",
    "AgentState",
    "Decision",
    "DecisionError",
    "HandoffDecision",
    "ReplyDecision",
    "parse_decision",
    "response_format",
]

"""Budgets and loop breakers, checked against the one spend ledger in PostgreSQL.

Checked when the supervisor dispatches a step, by the gateway before a tool call (after
journaling the response that asked for it, with its spend), and when a resumed step reads
its journal. Spend is written only with a journaled response (``supervisor.store._journal``).
Exceeding one stops the conversation with the reason and escalates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.supervisor.config._config import LoadedConfig

if TYPE_CHECKING:
    import asyncpg


@dataclass(frozen=True, kw_only=True)
class Budgets:
    """Limits per conversation and per agent per day (None: unlimited)."""

    max_tokens: int | None = None
    max_usd: float | None = None
    max_seconds: float | None = None
    daily_usd: Mapping[str, float | None] = field(default_factory=dict)
    max_same_tool_calls: int = 5

    def limits(self, agent: str) -> bool:
        """Whether any budget applies to ``agent``'s spending (else nothing needs reading)."""
        return (
            self.max_tokens is not None
            or self.max_usd is not None
            or self.max_seconds is not None
            or self.daily_usd.get(agent) is not None
        )

    @classmethod
    def from_config(cls, loaded: LoadedConfig) -> Budgets:
        """The budgets ``corral.yaml`` declares."""
        conversation = loaded.config.conversation
        return cls(
            max_tokens=conversation.max_tokens,
            max_usd=conversation.max_usd,
            max_seconds=conversation.max_seconds,
            daily_usd={name: agent.daily_usd for name, agent in loaded.config.agents.items()},
            max_same_tool_calls=conversation.max_same_tool_calls,
        )


async def exceeded(
    conn: asyncpg.Connection | asyncpg.Pool, budgets: Budgets, conversation: str, agent: str
) -> str | None:
    """Why ``agent`` may not spend more on ``conversation`` now, or None if it may."""
    if not budgets.limits(agent):
        return None
    row = await conn.fetchrow(
        "SELECT extract(epoch FROM now() - c.created_at) AS age, s.tokens, s.usd,"
        " (SELECT coalesce(sum(cost_usd), 0) FROM agent_spend a WHERE a.agent=$2 AND a.day=current_date)"
        "   AS agent_usd"
        " FROM conversations c, LATERAL (SELECT coalesce(sum(j.input_tokens + j.output_tokens), 0) AS tokens,"
        "   coalesce(sum(j.cost_usd), 0) AS usd FROM step_journal j WHERE j.conversation = c.id) AS s"
        " WHERE c.id=$1",
        conversation,
        agent,
    )
    if row is None:
        return None
    if budgets.max_seconds is not None and row["age"] >= budgets.max_seconds:
        return f"wall-clock budget of {budgets.max_seconds:.0f}s exceeded ({row['age']:.0f}s)"
    if budgets.max_tokens is not None and row["tokens"] >= budgets.max_tokens:
        return f"token budget of {budgets.max_tokens} exceeded ({row['tokens']} used)"
    if budgets.max_usd is not None and row["usd"] >= budgets.max_usd:
        return f"dollar budget of ${budgets.max_usd:.2f} exceeded (${row['usd']:.4f} spent)"
    daily = budgets.daily_usd.get(agent)
    if daily is not None and row["agent_usd"] >= daily:
        return f"{agent}'s daily budget of ${daily:.2f} exceeded (${row['agent_usd']:.4f} today)"
    return None


def repeated_call(budgets: Budgets, tool: str, repeats: int) -> str | None:
    """Why a tool call is a loop (the same tool on the same resource ``repeats`` times before
    in the conversation, as the gateway's ledger counts them: free text such as a reason does
    not make a call new), or None."""
    if repeats >= budgets.max_same_tool_calls:
        return (
            f"loop: {tool} with the same arguments {repeats} times"
            f" (counted by tool and resource; limit {budgets.max_same_tool_calls})"
        )
    return None

"""What a tool gateway is configured with: approval limits, grants, caps, budgets, limits
and the tool timeout."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from corral.bus import Limits
from corral.supervisor.store._budgets import Budgets


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Limits of the approval queue, what config grants, and the bounds of a call."""

    approval_ttl: timedelta = timedelta(hours=24)
    """How long a pending or granted approval stays valid (database time)."""
    max_pending_approvals: int = 100
    """Past this, calls that need approval are denied instead of queued."""
    budgets: Budgets = field(default_factory=Budgets)
    """Checked before every call; a call past a budget or in a loop stops the conversation."""
    grants: Mapping[str, Collection[str]] | None = None
    """The tools config grants each agent (``agents.<name>.tools``); any other tool is denied
    before policy. None: every tool is granted (policy alone decides)."""
    max_calls_per_step: Mapping[str, int] = field(default_factory=dict)
    """Per agent (``agents.<name>.max_tool_calls``): a call whose index is past it is refused
    and stops the conversation."""
    default_max_calls_per_step: int = 8
    """The cap for agents ``max_calls_per_step`` does not name."""
    call_timeout_s: float = 10.0
    """How long a tool body (``resource()`` and ``run()`` together) may take."""
    authenticating: Mapping[str, str] = field(default_factory=dict)
    """The tools that authenticate (``tools.authenticating``), each with the field of its
    result that names the customer it binds to an anonymous conversation."""
    limits: Limits = field(default_factory=Limits)
    """``tool_arguments_bytes`` and ``tool_result_bytes``: a call's arguments over it are
    invalid; a body whose result is over it is rolled back and the call answered error."""

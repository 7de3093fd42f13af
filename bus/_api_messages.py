"""Wire types of the HTTP API's questions to the supervisor: whose an API key is, and a
conversation as its client may see it. The API process holds no database credentials:
it asks (``corral.api.requests``, request/reply, published by the API's identity only)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from corral.bus._messages import Hop, Turn


class KeyCheck(msgspec.Struct, frozen=True, kw_only=True, tag="api.key_check"):
    """Whose is the API key with this SHA-256 digest (hex)?"""

    v: int = 1
    digest: str


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True, tag="api.key_info"):
    """An API key as its creator made it (``found`` False: no such key, or revoked)."""

    v: int = 1
    found: bool
    key_id: str = ""
    client: str = ""
    """The client it acts as: its conversations are that client's."""
    customer: str = ""
    """The one customer it may act for ("" : any, a backend's key)."""
    operator: bool = False


class ConversationQuery(msgspec.Struct, frozen=True, kw_only=True, tag="api.conversation_query"):
    """A conversation, as the API shows it."""

    v: int = 1
    conversation: str


class PendingApproval(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tool: str
    approver: str
    reason: str = ""


class ConversationView(msgspec.Struct, frozen=True, kw_only=True, tag="api.conversation_view"):
    """A conversation's state (``found`` False: there is none)."""

    v: int = 1
    found: bool
    conversation: str = ""
    client: str = ""
    customer: str = ""
    status: str = ""
    current_agent: str = ""
    path: list[Hop] = []
    transcript: list[Turn] = []
    reply: str | None = None
    reason: str | None = None
    pending_approval: PendingApproval | None = None
    cost_usd: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0


class QueueQuery(msgspec.Struct, frozen=True, kw_only=True, tag="api.queue_query"):
    """The human queue, oldest first."""

    v: int = 1
    limit: int = 100


class QueueView(msgspec.Struct, frozen=True, kw_only=True, tag="api.queue_view"):
    v: int = 1
    items: list[dict[str, Any]] = []


class ApprovalsQuery(msgspec.Struct, frozen=True, kw_only=True, tag="api.approvals_query"):
    """The pending approvals, oldest first."""

    v: int = 1


class ApprovalsView(msgspec.Struct, frozen=True, kw_only=True, tag="api.approvals_view"):
    v: int = 1
    items: list[dict[str, Any]] = []


ConsoleTopic = Literal["conversations", "trace", "graph", "agents", "alerts"]


class ConsoleQuery(msgspec.Struct, frozen=True, kw_only=True, tag="api.console_query"):
    """What the console shows (operators only): the conversations (newest first, of one
    ``status`` or current ``agent`` if given), one conversation's trace and transcript,
    the handoff graph's counts, the agents, the recent alerts."""

    v: int = 1
    topic: ConsoleTopic
    status: str = ""
    agent: str = ""
    conversation: str = ""
    limit: int = 100


class ConsoleView(msgspec.Struct, frozen=True, kw_only=True, tag="api.console_view"):
    v: int = 1
    items: list[dict[str, Any]] = []


class LoginRedeem(msgspec.Struct, frozen=True, kw_only=True, tag="api.login_redeem"):
    """Redeem a one-time console login (its SHA-256, hex) for a new operator key, which the
    API made: only its id and digest travel, and it is stored only if the login was good."""

    v: int = 1
    login_digest: str
    key_id: str
    key_digest: str


class LoginGranted(msgspec.Struct, frozen=True, kw_only=True, tag="api.login_granted"):
    v: int = 1
    granted: bool
    operator: str = ""
    """The operator's name the key acts as (its client), when granted."""
    reason: str = ""


ApiRequest = KeyCheck | ConversationQuery | QueueQuery | ApprovalsQuery | ConsoleQuery | LoginRedeem
"""Everything on ``corral.api.requests``."""

ApiAnswer = KeyInfo | ConversationView | QueueView | ApprovalsView | ConsoleView | LoginGranted

"""The sections of ``corral.yaml``, as pydantic models with documented defaults (loading and
checking them is ``config._config``'s)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.bus import Limits

HUMAN = "human"
"""The operators, as a source of the graph's edges (``graph.edges.human``: where they may
hand a conversation back to)."""

RESERVED_NAMES = frozenset({"supervisor", "gateway", "router", "client", "admin", "api", HUMAN})
"""Names no agent may take: corral's own processes and identities."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsSection(_Strict):
    """Where NATS is; unset means an embedded nats-server (``NATS_URL`` overrides)."""

    url: str | None = None
    """One or more ``nats://`` URLs, comma-separated."""
    ack_wait_s: float = Field(default=30.0, gt=0)
    """How long a delivered step may go without an ack or a heartbeat before it is
    redelivered (agents send a heartbeat every third of it during long steps)."""
    max_deliver: int = Field(default=10, ge=1)
    """Deliveries of one message before it is dead-lettered."""
    stream_replicas: int = Field(default=1, ge=1, le=5)
    """Copies of each stream (3 on a 3-node cluster); ``CORRAL_STREAM_REPLICAS`` wins."""
    monitor_port: int | None = Field(default=None, ge=0, le=65535)
    """The embedded nats-server's HTTP monitoring port (``/connz``, ``/jsz``), on loopback
    only; unset (the default) serves none, 0 picks a free port. ``CORRAL_NATS_MONITOR_PORT``
    wins. The endpoint is unauthenticated: it names every connection and consumer."""


class DatabaseSection(_Strict):
    """Where PostgreSQL is; unset means an embedded server (``DATABASE_URL`` overrides)."""

    url: str | None = None
    """The owner's DSN: migrations (and tool modules' ``setup``) run as this role."""
    supervisor_url: str | None = None
    """The DSN the supervisor (and a separate gateway) connect with: a role that may append
    to ``audit_log`` only through ``corral_audit_append`` (see the README).
    ``CORRAL_SUPERVISOR_DATABASE_URL`` wins. Unset: ``corral up`` derives it from ``url``
    for the role ``corral_supervisor``, which it creates (and gives a fresh password) when
    ``url``'s role may; otherwise the services use ``url`` itself."""


class AuditSection(_Strict):
    """The audit chain's anchors outside PostgreSQL."""

    anchor_interval_s: float = Field(default=10.0, gt=0)
    """How often the supervisor signs and publishes ``(count, head hash)`` of ``audit_log``
    (it also does at start and on shutdown)."""


class ModelPriceSection(_Strict):
    """A model's price."""

    input_per_mtok: float = Field(default=0.0, ge=0)
    """Dollars per million input tokens."""
    output_per_mtok: float = Field(default=0.0, ge=0)
    """Dollars per million output tokens."""


class ModelTierSection(_Strict):
    """A model tier: a litellm model name and its fallbacks."""

    model: str
    """e.g. ``openai/gpt-4o-mini``, ``anthropic/claude-3-5-haiku-latest``, ``ollama/llama3``,
    or ``scripted/<rules>`` for the offline scripted provider."""
    fallbacks: list[str] = Field(default_factory=list)
    api_base: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (litellm's defaults otherwise)."""
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    """One model call's timeout; each retry and each fallback gets its own."""
    retries: int = Field(default=2, ge=0)
    """Retries of one model on a rate limit (429), a 5xx or a timeout, before its fallbacks."""
    retry_backoff_s: float = Field(default=0.5, ge=0)
    """The first retry's pause; it doubles with jitter, and a ``Retry-After`` header wins."""
    cooldown_after: int = Field(default=3, ge=1)
    """Failures of one model before it is left alone for ``cooldown_s`` (every agent's calls
    count: they all pass the model gateway)."""
    cooldown_s: float = Field(default=30.0, ge=0)
    tools: Literal["auto", "native", "json_schema", "text"] = "auto"
    """How the models are offered tools: ``native`` function calling, ``json_schema``
    structured output, or the ``text`` protocol; ``auto`` asks litellm what each supports."""
    prices: dict[str, ModelPriceSection] = Field(default_factory=dict)
    """Dollars per million tokens by model name, for models litellm's price map does not
    know (vLLM, Ollama) or to override it."""
    via: Literal["litellm", "direct"] = "litellm"
    """``litellm`` (every model) or ``direct``: a ``scripted/<rules>`` model answers at
    corral's own model interface, without litellm (the benchmark measures both)."""


class AgentSection(_Strict):
    """One agent of the team."""

    tier: str = "fast"
    """Which entry of ``models`` the agent calls."""
    instructions: str
    """The agent's instructions, or a path (relative to this file) to a file holding them."""
    replicas: int = Field(default=1, ge=1)
    """Processes ``corral up`` starts for this agent; they share one durable consumer."""
    tools: list[str] = Field(default_factory=list)
    """Tools the agent's model is offered (the policies still decide every call). The
    gateway denies any other tool the agent calls, before policy."""
    max_tool_calls: int = Field(default=8, ge=1, le=1000)
    """Tool calls per step. The gateway refuses a call past it and stops the conversation."""
    daily_usd: float | None = Field(default=None, ge=0)
    """Model dollars this agent may spend per day, across all its conversations."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """A reply below this is asked again on the next stronger tier, then escalated
    (default: ``graph.min_confidence``)."""


class ToolsSection(_Strict):
    """Where the tools and the policies that govern them are."""

    path: str | None = None
    """A Python file exposing ``TOOLS`` (and optionally ``async setup(conn)``, run once to
    prepare the tools' backend, and ``SCHEMAS``, the schemas its statements reach),
    relative to this file. Give ``path`` or ``module``, not both."""
    module: str | None = None
    """Instead of ``path``: the import path of an installed module exposing the same."""
    policies: str
    """Directory of Cedar policies (``*.cedar``), relative to this file."""
    max_pending_approvals: int = Field(default=100, ge=0)
    """Past this, calls needing approval are denied instead of queued."""
    approval_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    """How long an approval request or a granted approval stays valid."""
    approvers: dict[str, list[str]] = Field(default_factory=dict)
    """Who may decide an approval whose policy names ``@approver(role)``: the operators
    (their ``--by`` names, or an operator API key's client) of each role listed. A role
    not listed may be decided by any operator."""
    authenticating: dict[str, str] = Field(default_factory=dict)
    """The tools that authenticate the customer, each with the field of its result that
    names them (``{verify_customer: customer_id}``): such a tool's successful call binds an
    anonymous conversation's customer, once, from its result (never from the model's
    arguments), and the binding is audited."""
    separate_gateway: bool = False
    """Run the gateway as its own process (`corral gateway run`) instead of inside the
    supervisor; ``corral up`` then starts it, and it alone holds the backend's access."""
    call_timeout_s: float = Field(default=10.0, gt=0)
    """How long one tool call's body (``resource()`` and ``run()``) may take; past it the
    call is rolled back and answered ``error``."""

    @model_validator(mode="after")
    def _one_source(self) -> ToolsSection:
        if (self.path is None) == (self.module is None):
            raise ValueError("give the tools' `path` (a file beside this config) or `module`, one of them")
        return self

    @property
    def reference(self) -> str:
        """What ``import_tools`` loads: the file's absolute path (``load_config`` resolves
        it), or the module's import path."""
        return self.path or self.module or ""


class EdgeSection(_Strict):
    """One allowed handoff, with what it needs."""

    to: str
    """The target agent."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """A handoff along this edge below this is asked again on the next stronger tier, then
    escalated (default: ``graph.min_confidence``)."""
    payload: str | None = None
    """The pydantic model the handoff carries: a name in the team's tools module, or
    ``module:Name``. It is the ``transfer_to_<to>`` tool's argument schema, and the
    supervisor refuses a payload that does not validate. None: a ``reason``."""


class GraphSection(_Strict):
    """Who may hand off to whom."""

    entry: str
    """The agent every conversation starts with."""
    edges: dict[str, list[str | EdgeSection]] = Field(default_factory=dict)
    """Allowed handoffs: source agent -> the agents it may hand off to (names, or edges
    with a threshold and a payload)."""
    min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """A handoff or reply below this confidence is asked again on the next stronger tier;
    if still below, it is escalated (to ``escalate_to``, else to a human)."""
    tiers: list[str] = Field(default_factory=list)
    """Model tiers from weakest to strongest: a low-confidence answer is asked again on each
    tier after the agent's own, in this order. Empty: no second tier."""
    escalate_to: str | None = None
    """The agent a step still below its threshold on the strongest tier is handed to
    (None: a human)."""

    def edge_list(self, source: str) -> list[EdgeSection]:
        """The edges from ``source``, each as an ``EdgeSection``."""
        return [e if isinstance(e, EdgeSection) else EdgeSection(to=e) for e in self.edges.get(source, [])]


class ConversationSection(_Strict):
    """Limits on one conversation."""

    max_steps: int = Field(default=10, ge=1)
    """Agent steps before the conversation is escalated instead of handed off again."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Model tokens (in + out) one conversation may use."""
    max_usd: float | None = Field(default=None, ge=0)
    """Model dollars one conversation may spend."""
    max_seconds: float | None = Field(default=None, gt=0)
    """Wall-clock seconds from the conversation's start."""
    max_same_tool_calls: int = Field(default=5, ge=1)
    """Calls of one tool with the same arguments in one conversation before it is stopped."""
    max_pingpong: int = Field(default=3, ge=1)
    """Handoffs back and forth between the same two agents before it is stopped."""
    idle_timeout_s: float = Field(default=1800.0, gt=0)
    """Seconds a conversation may await its customer's next message before it is closed."""
    max_running_per_client: int = Field(default=256, ge=1, le=100_000)
    """A client's share: how many of its conversations run at once. A start past it waits,
    ``queued``, and is admitted oldest first as the client's running ones stop running, so a
    flood from one client cannot make another client's conversations wait behind it."""
    window_turns: int = Field(default=20, ge=1, le=1000)
    """Turns of the transcript an agent is shown before the customer's latest message (older
    ones stay in PostgreSQL, not in the model's history)."""


class ApiSection(_Strict):
    """The HTTP/SSE API (``corral api run``; ``corral up`` starts it)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Where it listens; loopback unless a proxy in front of it terminates TLS."""
    port: int = Field(default=8321, ge=0, le=65535)
    """0: any free port (``corral up`` prints the URL)."""
    rate_per_s: float = Field(default=20.0, gt=0)
    """Starts and messages one API key may send a second, on average."""
    burst: int = Field(default=40, ge=1)
    """...and at once."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)


class QueueSection(_Strict):
    """The human queue: escalated conversations, for operators to take."""

    claim_ttl_s: float = Field(default=900.0, gt=0)
    """How long an operator's claim holds without an action; then it returns to the queue."""


class LimitsSection(_Strict):
    """How big what arrives at corral's edges may be, in bytes of UTF-8. What is bigger is
    refused with the reason (the client sees it) and dead-lettered; whatever corral derives
    from an input is built from parts within these, and checked against the NATS server's
    ``max_payload`` (1 MiB by default) before it is sent."""

    customer_text_bytes: int = Field(default=16 * 1024, ge=1)
    """A conversation start's text."""
    customer_id_bytes: int = Field(default=256, ge=1)
    """A conversation start's customer id."""
    reply_text_bytes: int = Field(default=32 * 1024, ge=1)
    """An agent's reply to the customer; a longer one fails the step with the reason."""
    reason_bytes: int = Field(default=4 * 1024, ge=64)
    """A handoff's, a failure's or a wait's reason."""
    response_text_bytes: int = Field(default=64 * 1024, ge=1024)
    """A model response as journaled; the agent cuts a longer one (saying so) and keeps
    what it cost."""
    tool_arguments_bytes: int = Field(default=16 * 1024, ge=1)
    """A tool call's arguments, encoded as JSON."""
    tool_result_bytes: int = Field(default=64 * 1024, ge=1)
    """A tool call's result, encoded as JSON."""
    dead_letter_body_bytes: int = Field(default=64 * 1024, ge=1024, le=96 * 1024)
    """How much of a message's body its dead letter keeps (the rest is cut, and the
    ``Corral-Dead-Truncated`` header gives the original size)."""
    dead_letter_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """What ``CORRAL_DLQ`` holds at most; past it the oldest dead letters go first."""
    dead_letter_max_age_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """How long ``CORRAL_DLQ`` keeps a dead letter."""

    def to_limits(self) -> Limits:
        """The limits as the bus, the supervisor and the agents take them."""
        return Limits(
            customer_text_bytes=self.customer_text_bytes,
            customer_id_bytes=self.customer_id_bytes,
            reply_text_bytes=self.reply_text_bytes,
            reason_bytes=self.reason_bytes,
            response_text_bytes=self.response_text_bytes,
            tool_arguments_bytes=self.tool_arguments_bytes,
            tool_result_bytes=self.tool_result_bytes,
            dead_letter_body_bytes=self.dead_letter_body_bytes,
        )


class RouterSection(_Strict):
    """The model gateway (`corral router run`)."""

    replicas: int = Field(default=1, ge=1)
    """Processes ``corral up`` starts; they share the calls in one queue group."""


class TelemetrySection(_Strict):
    """Spans (``corral.bus.spans``): every process sends its own to the supervisor, which
    keeps them for ``corral trace`` and the console, and exports them over OTLP/HTTP when
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set in its environment. Message content is recorded
    only with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``."""

    enabled: bool = True
    """Make spans at all (off: no process makes any, and nothing is stored or exported)."""
    store: bool = True
    """Keep every process's spans in PostgreSQL (no collector needed)."""
    retention_hours: float = Field(default=168.0, gt=0)
    """How long the store keeps a span; older ones are deleted every few minutes."""


AlertKind = Literal["tool_rate", "repeated_call", "retry_storm", "cost_outlier"]
"""What an anomaly alert is about (``corral.alerts``)."""


class AlertsSection(_Strict):
    """Anomaly alerts: on ``corral.alerts``, in the console and in ``corral status``.

    The supervisor reads every tool call from the audit chain and every ended conversation's
    cost; the model gateway counts the failed attempts toward each model. An alert of a
    kind named in ``auto_kill`` also kills the agent it names (as an operator's kill would:
    audited, and undone by ``corral revive``)."""

    enabled: bool = True
    window_s: float = Field(default=10.0, gt=0)
    """The window an agent's tool calls, and a model's failed attempts, are counted in."""
    baseline_windows: int = Field(default=30, ge=1)
    """An agent's rolling baseline: its mean tool calls per window over this many windows."""
    tool_rate_factor: float = Field(default=5.0, gt=1)
    """A window's tool calls over this many times the baseline is an alert ..."""
    tool_rate_min_calls: int = Field(default=30, ge=1)
    """... once they are at least this many (a quiet agent's first calls are not a burst)."""
    repeated_calls: int = Field(default=3, ge=2)
    """The same tool with the same arguments this many times in a conversation."""
    retry_storm_failures: int = Field(default=10, ge=2)
    """Failed attempts toward one model within a window."""
    cost_factor: float = Field(default=5.0, gt=1)
    """An ended conversation costing this many times the median of its path ..."""
    cost_min_samples: int = Field(default=20, ge=3)
    """... once that path has this many conversations to take the median of."""
    quiet_s: float = Field(default=300.0, ge=0)
    """The same alert (its kind and what it is about) is not raised again for this long."""
    auto_kill: list[Literal["tool_rate", "repeated_call", "retry_storm"]] = Field(default_factory=list)
    """Kinds that also kill the agent they name (a cost outlier's conversation has ended)."""


class CorralConfig(_Strict):
    """The whole ``corral.yaml``."""

    version: Literal[1] = 1
    state_dir: str = ".corral"
    """Where embedded servers keep their data, relative to the working directory."""
    nats: NatsSection = NatsSection()
    database: DatabaseSection = DatabaseSection()
    audit: AuditSection = AuditSection()
    models: dict[str, ModelTierSection]
    router: RouterSection = RouterSection()
    scripted: dict[str, str] = Field(default_factory=dict)
    """Rules files of the scripted provider: ``scripted/<name>`` -> path (relative to this file)."""
    agents: dict[str, AgentSection]
    graph: GraphSection
    conversation: ConversationSection = ConversationSection()
    queue: QueueSection = QueueSection()
    api: ApiSection = ApiSection()
    limits: LimitsSection = LimitsSection()
    telemetry: TelemetrySection = TelemetrySection()
    alerts: AlertsSection = AlertsSection()
    tools: ToolsSection | None = None

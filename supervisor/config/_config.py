"""``corral.yaml``: the typed configuration, loaded and checked in one place.

Errors name the file, the line and the field, and say what was expected::

    corral.yaml:31: graph.edges.triage[2]: 'billing' is not an agent; expected one of: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corral.bus import Limits, subjects
from corral.router import SCRIPTED_PROVIDER, ModelTier
from corral.supervisor.config._tools_module import import_tools
from corral.supervisor.errors import ConfigError

DEFAULT_CONFIG = "corral.yaml"
SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "support" / "corral.yaml"


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
    retries: int = Field(default=2, ge=0)
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


class GraphSection(_Strict):
    """Who may hand off to whom."""

    entry: str
    """The agent every conversation starts with."""
    edges: dict[str, list[str]] = Field(default_factory=dict)
    """Allowed handoffs: source agent -> the agents it may hand off to."""
    min_confidence: float = Field(default=0.5, ge=0.0, le=1.0)
    """A handoff below this confidence is escalated to a human instead of forwarded."""


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


class CorralConfig(_Strict):
    """The whole ``corral.yaml``."""

    version: Literal[1] = 1
    state_dir: str = ".corral"
    """Where embedded servers keep their data, relative to the working directory."""
    nats: NatsSection = NatsSection()
    database: DatabaseSection = DatabaseSection()
    audit: AuditSection = AuditSection()
    models: dict[str, ModelTierSection]
    scripted: dict[str, str] = Field(default_factory=dict)
    """Rules files of the scripted provider: ``scripted/<name>`` -> path (relative to this file)."""
    agents: dict[str, AgentSection]
    graph: GraphSection
    conversation: ConversationSection = ConversationSection()
    limits: LimitsSection = LimitsSection()
    tools: ToolsSection | None = None


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with file references resolved."""

    path: Path
    config: CorralConfig
    instructions: dict[str, str]
    scripted_rules: dict[str, Path]

    @property
    def policies_dir(self) -> Path | None:
        """The Cedar policies directory, if tools are configured."""
        tools = self.config.tools
        return (self.path.resolve().parent / tools.policies) if tools else None

    @property
    def agent_names(self) -> list[str]:
        """Agent names in file order."""
        return list(self.config.agents)

    def tier(self, agent: str, api_keys: Mapping[str, str] | None = None) -> ModelTier:
        """The model tier ``agent`` calls, as router data.

        Args:
            agent: The agent.
            api_keys: Environment values by variable name, for the tier's ``api_key_env``
                (``Settings`` reads them once); without it the tier has no API key, and
                litellm uses its defaults.
        """
        name = self.config.agents[agent].tier
        section = self.config.models[name]
        return ModelTier(
            name=name,
            model=section.model,
            fallbacks=list(section.fallbacks),
            api_base=section.api_base,
            api_key=(api_keys or {}).get(section.api_key_env) if section.api_key_env else None,
            temperature=section.temperature,
            max_tokens=section.max_tokens,
            timeout_s=section.timeout_s,
            retries=section.retries,
            via=section.via,
        )

    def targets(self, agent: str) -> list[str]:
        """Agents ``agent`` may hand off to."""
        return list(self.config.graph.edges.get(agent, []))


def resolve_config_path(option: str | None) -> Path:
    """``-c`` if given, else ``./corral.yaml`` if present, else the sample team."""
    if option:
        return Path(option)
    local = Path(DEFAULT_CONFIG)
    return local if local.exists() else SAMPLE_CONFIG


def load_config(path: Path, *, check_tools: bool = True) -> LoadedConfig:
    """Read, validate and resolve a ``corral.yaml``.

    Args:
        path: The file.
        check_tools: Import the tools module and check every tool an agent names (what
            runs the team does; a command that only talks to it skips the import).

    Raises:
        ConfigError: naming the file, line and field of the first problems found.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}", path=str(path)) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}", path=str(path), line=line) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}:1: expected a mapping of settings at the top level", path=str(path), line=1
        )
    tools = raw.get("tools")
    if isinstance(tools, dict) and isinstance(tools.get("path"), str):
        # Relative to this file, whichever directory the process runs in.
        raw = {**raw, "tools": {**tools, "path": str((path.resolve().parent / tools["path"]).resolve())}}
    try:
        config = CorralConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [(tuple(err["loc"]), _describe(err)) for err in exc.errors(include_url=False)]
        raise _config_error(path, root, problems) from exc
    problems = _check_references(config) + (_check_tools(config) if check_tools else [])
    if problems:
        raise _config_error(path, root, problems)
    base = path.resolve().parent
    instructions = {}
    for name, agent in config.agents.items():
        instructions[name] = _read_instructions(path, root, base, name, agent.instructions)
    rules = {name: base / file for name, file in config.scripted.items()}
    for name, file in rules.items():
        if not file.is_file():
            raise _config_error(path, root, [(("scripted", name), f"rules file {file} does not exist")])
    return LoadedConfig(path=path, config=config, instructions=instructions, scripted_rules=rules)


def _read_instructions(path: Path, root: yaml.Node | None, base: Path, agent: str, value: str) -> str:
    candidate = base / value
    if "\n" not in value and candidate.suffix in {".md", ".txt"}:
        try:
            return candidate.read_text()
        except OSError as exc:
            raise _config_error(
                path,
                root,
                [(("agents", agent, "instructions"), f"cannot read {candidate}: {exc.strerror}")],
            ) from exc
    return value


def _check_references(config: CorralConfig) -> list[tuple[tuple[Any, ...], str]]:
    agents = sorted(config.agents)
    known = ", ".join(agents)
    problems: list[tuple[tuple[Any, ...], str]] = []
    for name in config.agents:
        try:
            subjects.check_token(name, "agent name")
        except ValueError as exc:
            problems.append((("agents", name), str(exc)))
    for name, agent in config.agents.items():
        if agent.tier not in config.models:
            problems.append(
                (
                    ("agents", name, "tier"),
                    f"{agent.tier!r} is not a model tier; expected one of: "
                    f"{', '.join(sorted(config.models))}",
                )
            )
    if config.graph.entry not in config.agents:
        problems.append(
            (
                ("graph", "entry"),
                f"{config.graph.entry!r} is not an agent; expected one of: {known}",
            )
        )
    for source, targets in config.graph.edges.items():
        if source not in config.agents:
            problems.append(
                (
                    ("graph", "edges", source),
                    f"{source!r} is not an agent; expected one of: {known}",
                )
            )
        for index, target in enumerate(targets):
            if target not in config.agents:
                problems.append(
                    (
                        ("graph", "edges", source, index),
                        f"{target!r} is not an agent; expected one of: {known}",
                    )
                )
    for tier_name, tier in config.models.items():
        if tier.via == "direct" and (not tier.model.startswith(f"{SCRIPTED_PROVIDER}/") or tier.fallbacks):
            problems.append(
                (("models", tier_name, "via"), "`direct` takes one scripted/<rules> model and no fallbacks")
            )
        for index, model in enumerate([tier.model, *tier.fallbacks]):
            if model.startswith(f"{SCRIPTED_PROVIDER}/"):
                rules = model.split("/", 1)[1]
                if rules not in config.scripted:
                    where = ("models", tier_name, "model" if index == 0 else "fallbacks")
                    problems.append((where, f"{model!r} needs rules: add `scripted: {{{rules}: FILE}}`"))
    return problems


def load_tools(config: CorralConfig) -> dict[str, Any]:
    """The tools of ``config.tools`` by name (empty without a tools section)."""
    if config.tools is None:
        return {}
    module = import_tools(config.tools.reference)
    return {tool.name: tool for tool in getattr(module, "TOOLS", [])}


def _check_tools(config: CorralConfig) -> list[tuple[tuple[Any, ...], str]]:
    wanted = {
        (name, index, tool) for name, agent in config.agents.items() for index, tool in enumerate(agent.tools)
    }
    if config.tools is None:
        return [
            (("agents", name, "tools", index), "needs a top-level `tools:` section")
            for name, index, _ in sorted(wanted)
        ]
    where = ("tools", "path" if config.tools.path is not None else "module")
    try:
        tools = load_tools(config)
    except ImportError as exc:
        return [(where, f"cannot import {config.tools.reference!r}: {exc}")]
    if not tools:
        return [(where, f"{config.tools.reference!r} defines no TOOLS")]
    known = ", ".join(sorted(tools))
    return [
        (("agents", name, "tools", index), f"{tool!r} is not a tool; expected one of: {known}")
        for name, index, tool in sorted(wanted)
        if tool not in tools
    ]


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "is required but missing"
    if error["type"] == "extra_forbidden":
        return "is not a known setting"
    value = error.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict | list) else ""
    return f"{error['msg']}{shown}"


def _config_error(
    path: Path, root: yaml.Node | None, problems: list[tuple[tuple[Any, ...], str]]
) -> ConfigError:
    lines = []
    first_line: int | None = None
    first_field: str | None = None
    for loc, message in problems:
        field = _dotted(loc)
        line = _line_of(root, loc)
        first_line = first_line or line
        first_field = first_field or field
        lines.append(f"{path}:{line}: {field}: {message}")
    return ConfigError("\n".join(lines), path=str(path), line=first_line, field=first_field)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the deepest node along ``loc`` that exists in the YAML."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line

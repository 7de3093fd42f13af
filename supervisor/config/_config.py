"""``corral.yaml``: the typed configuration, loaded and checked in one place.

Errors name the file, the line and the field, and say what was expected::

    corral.yaml:31: graph.edges.triage[2]: 'billing' is not an agent; expected one of: ...
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from corral.bus import subjects
from corral.router import SCRIPTED_PROVIDER, ModelPrice, ModelTier
from corral.supervisor.config._sections import (
    HUMAN as HUMAN,
)
from corral.supervisor.config._sections import (
    RESERVED_NAMES as RESERVED_NAMES,
)
from corral.supervisor.config._sections import (
    AgentSection as AgentSection,
)
from corral.supervisor.config._sections import (
    AuditSection as AuditSection,
)
from corral.supervisor.config._sections import (
    ConversationSection as ConversationSection,
)
from corral.supervisor.config._sections import (
    CorralConfig as CorralConfig,
)
from corral.supervisor.config._sections import (
    DatabaseSection as DatabaseSection,
)
from corral.supervisor.config._sections import (
    EdgeSection as EdgeSection,
)
from corral.supervisor.config._sections import (
    GraphSection as GraphSection,
)
from corral.supervisor.config._sections import (
    LimitsSection as LimitsSection,
)
from corral.supervisor.config._sections import (
    ModelPriceSection as ModelPriceSection,
)
from corral.supervisor.config._sections import (
    ModelTierSection as ModelTierSection,
)
from corral.supervisor.config._sections import (
    NatsSection as NatsSection,
)
from corral.supervisor.config._sections import (
    RouterSection as RouterSection,
)
from corral.supervisor.config._sections import (
    ToolsSection as ToolsSection,
)
from corral.supervisor.config._tools_module import import_tools
from corral.supervisor.errors import ConfigError

DEFAULT_CONFIG = "corral.yaml"
SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "support" / "corral.yaml"


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
        """The model tier ``agent`` calls, as router data (``model_tier``)."""
        return self.model_tier(self.config.agents[agent].tier, api_keys)

    def model_tier(self, name: str, api_keys: Mapping[str, str] | None = None) -> ModelTier:
        """The model tier ``name``, as router data.

        Args:
            name: The tier.
            api_keys: Environment values by variable name, for the tier's ``api_key_env``
                (``Settings`` reads them once); without it the tier has no API key, and
                litellm uses its defaults.
        """
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
            retry_backoff_s=section.retry_backoff_s,
            cooldown_after=section.cooldown_after,
            cooldown_s=section.cooldown_s,
            tools=section.tools,
            prices={
                model: ModelPrice(input_per_mtok=price.input_per_mtok, output_per_mtok=price.output_per_mtok)
                for model, price in section.prices.items()
            },
            via=section.via,
        )

    def targets(self, agent: str) -> list[str]:
        """Agents ``agent`` may hand off to."""
        return [edge.to for edge in self.config.graph.edge_list(agent)]

    def tiers_of(self, agent: str) -> list[str]:
        """The tier ``agent`` calls, then the stronger ones a low-confidence answer is asked
        again on (``graph.tiers`` after it)."""
        own, order = self.config.agents[agent].tier, self.config.graph.tiers
        return [own, *order[order.index(own) + 1 :]] if own in order else [own]


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
    problems = _check_references(config) + (
        _check_tools(config) + _check_payloads(config) if check_tools else []
    )
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
        if name in RESERVED_NAMES:
            problems.append((("agents", name), f"{name!r} is the name of one of corral's own processes"))
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
        if source not in config.agents and source != HUMAN:
            problems.append(
                (
                    ("graph", "edges", source),
                    f"{source!r} is not an agent; expected one of: {known}",
                )
            )
        for index, edge in enumerate(targets):
            target = edge.to if isinstance(edge, EdgeSection) else edge
            if target not in config.agents:
                problems.append(
                    (
                        ("graph", "edges", source, index),
                        f"{target!r} is not an agent; expected one of: {known}",
                    )
                )
    for index, tier_name in enumerate(config.graph.tiers):
        if tier_name not in config.models:
            problems.append(
                (
                    ("graph", "tiers", index),
                    f"{tier_name!r} is not a model tier; expected one of: {', '.join(sorted(config.models))}",
                )
            )
    escalate_to = config.graph.escalate_to
    if escalate_to is not None and escalate_to not in config.agents:
        problems.append(
            (("graph", "escalate_to"), f"{escalate_to!r} is not an agent; expected one of: {known}")
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


def load_payload(config: CorralConfig, reference: str) -> type[BaseModel]:
    """The pydantic model an edge's ``payload`` names: ``module:Name``, or a name in the
    team's tools module.

    Raises:
        ImportError: the module cannot be imported.
        LookupError: it has no such name, or the name is not a pydantic model.
    """
    if ":" in reference:
        module_name, name = reference.split(":", 1)
        module = importlib.import_module(module_name)
    elif config.tools is not None:
        module, name = import_tools(config.tools.reference), reference
    else:
        raise LookupError(f"{reference!r} needs a `tools:` section to be found in, or `module:Name`")
    found = getattr(module, name, None)
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        raise LookupError(f"{reference!r} is not a pydantic model in {module.__name__}")
    return found


def load_payloads(config: CorralConfig) -> dict[tuple[str, str], type[BaseModel]]:
    """Every edge's payload model, by (source, target)."""
    return {
        (source, edge.to): load_payload(config, edge.payload)
        for source in config.graph.edges
        for edge in config.graph.edge_list(source)
        if edge.payload is not None
    }


def _check_payloads(config: CorralConfig) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    for source, edges in config.graph.edges.items():
        for index, edge in enumerate(edges):
            if isinstance(edge, EdgeSection) and edge.payload is not None:
                try:
                    load_payload(config, edge.payload)
                except (ImportError, LookupError) as exc:
                    problems.append((("graph", "edges", source, index, "payload"), str(exc)))
    return problems


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
        *(
            (("agents", name, "tools", index), f"{tool!r} is not a tool; expected one of: {known}")
            for name, index, tool in sorted(wanted)
            if tool not in tools
        ),
        *(
            (("tools", "authenticating", tool), f"{tool!r} is not a tool; expected one of: {known}")
            for tool in sorted(config.tools.authenticating)
            if tool not in tools
        ),
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

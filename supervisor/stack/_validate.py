"""``corral validate``: everything a team's processes read at start, checked before any starts.

``validate()`` loads the config as every command does (``Settings.load``: the YAML, its
fields and references, the instructions files, the tools module and the tools the agents
name), then checks what the services would only find out once running: the tools' argument
schemas, the Cedar policies (loaded by ``policy_engine``, the function the supervisor's
gateway loads them with, so whatever that checks is checked here too), the scripted
model's rules and that each scripted agent has some, and that every model tier an agent
calls has its API key (``api_key_env``) set. The first problem is raised as a
``ConfigError`` naming its file and line; otherwise the list of what was checked is
returned. ``corral up`` runs it before it starts anything.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from corral.supervisor.errors import ConfigError
from corral.supervisor.stack._settings import Settings

if TYPE_CHECKING:
    from corral.router import ScriptRules
    from corral.supervisor.gateway._policy import PolicyEngine


@dataclass(frozen=True)
class Checked:
    """One thing ``validate`` checked, and what it found."""

    what: str
    detail: str


def validate(
    config_option: str | None, environ: Mapping[str, str] | None = None
) -> tuple[Settings, list[Checked]]:
    """Load and ``check`` the team the config ``-c`` names, as its processes will read it.

    Raises:
        ConfigError: the first problem, naming its file and line.
    """
    settings = load_settings(config_option, environ)
    return settings, check(settings)


def check(settings: Settings) -> list[Checked]:
    """Check what a loaded team's processes read at start beyond the config itself.

    Raises:
        ConfigError: the first problem, naming its file and line.
    """
    loaded, config = settings.loaded, settings.config
    checked = [
        Checked(
            "config",
            f"{settings.path}: {len(config.agents)} agents ({', '.join(loaded.agent_names)}), "
            f"entry {config.graph.entry}, {len(config.models)} model tiers",
        )
    ]
    files = [a.instructions for a in config.agents.values() if _is_file(a.instructions)]
    checked.append(Checked("instructions", f"{len(config.agents)} agents, {len(files)} from files"))
    checked += _check_tools(settings)
    checked += _check_rules(settings)
    checked.append(_check_keys(settings))
    return checked


def load_settings(config_option: str | None, environ: Mapping[str, str] | None = None) -> Settings:
    """``Settings.load``, with a tools module that fails to import (a syntax error, an
    exception at import) reported as a ``ConfigError`` at its file and line.

    Raises:
        ConfigError: the config, or its tools module, is invalid.
    """
    try:
        return Settings.load(config_option, environ)
    except ConfigError:
        raise
    except Exception as exc:
        raise _code_error(exc, "cannot import the tools") from exc


def policy_engine(settings: Settings) -> PolicyEngine:
    """The team's Cedar policies, loaded and checked against its tools (their Cedar schema)
    as the tool gateway runs them: the supervisor's start calls this, and so does
    ``validate``, so that both find the same problems.

    Raises:
        PolicyError: a policy file is invalid, or a policy does not validate against the
            tools' schema (it names the file and line).
    """
    from corral.supervisor.gateway._policy import PolicyEngine

    policies_dir = settings.loaded.policies_dir
    assert policies_dir is not None, "a team with tools has policies"
    return PolicyEngine.load(policies_dir, settings.tools.values(), strict=True)


def model_key_problem(settings: Settings, tier: str) -> ConfigError | None:
    """Why model tier ``tier`` cannot be called: its ``api_key_env`` names a variable that is
    unset (or empty); None if it has its key or needs none."""
    variable = settings.config.models[tier].api_key_env
    if not variable or settings.api_keys.get(variable):
        return None
    users = [name for name, a in settings.config.agents.items() if tier in settings.loaded.tiers_of(name)]
    line = _line_of(settings.path, ("models", tier, "api_key_env"))
    return ConfigError(
        f"{settings.path}:{line}: models.{tier}.api_key_env: the environment variable {variable} "
        f"is not set (the API key of tier {tier!r}, which {', '.join(users) or 'no agent'} call)",
        path=str(settings.path),
        line=line,
        field=f"models.{tier}.api_key_env",
    )


def _check_tools(settings: Settings) -> list[Checked]:
    from corral.supervisor.gateway._policy import PolicyError

    tools_section = settings.config.tools
    if tools_section is None:
        return [Checked("tools", "none configured (no tools: section)")]
    try:
        for agent in settings.loaded.agent_names:
            settings.agent_settings(agent)  # every offered tool's JSON Schema, as agents build it
    except ConfigError:
        raise
    except Exception as exc:
        raise _code_error(exc, "a tool's argument schema fails") from exc
    tools = settings.tools
    try:
        engine = policy_engine(settings)
    except PolicyError as exc:
        path = exc.file or str(settings.loaded.policies_dir)
        where = f"{path}:{exc.line}" if exc.line else path
        message = str(exc) if str(exc).startswith(path) else f"{where}: {exc}"
        raise ConfigError(message, path=path, line=exc.line) from exc
    policies_dir = settings.loaded.policies_dir
    assert policies_dir is not None
    return [
        Checked("tools", f"{len(tools)} from {tools_section.reference}: {', '.join(sorted(tools))}"),
        Checked(
            "policies",
            f"{len(engine.policy_ids)} in {len(list(policies_dir.glob('*.cedar')))} files in {policies_dir}",
        ),
    ]


def _check_rules(settings: Settings) -> list[Checked]:
    from corral.router import SCRIPTED_PROVIDER

    config = settings.config
    found: list[Checked] = []
    loaded_rules: dict[str, ScriptRules] = {}
    for name, path in settings.loaded.scripted_rules.items():
        loaded_rules[name] = _load_rules(path)
        found.append(Checked("scripted rules", f"{path}: {len(loaded_rules[name].agents)} agents"))
    for agent, section in config.agents.items():
        tier = config.models[section.tier]
        if tier.fallbacks or not tier.model.startswith(f"{SCRIPTED_PROVIDER}/"):
            continue
        name = tier.model.split("/", 1)[1]
        if agent not in loaded_rules[name].agents:
            path = settings.loaded.scripted_rules[name]
            line = _line_of(path, ("agents",))
            raise ConfigError(
                f"{path}:{line}: agents: no rules for {agent!r}, whose tier {section.tier!r} is "
                f"{tier.model}: every call it makes would fail",
                path=str(path),
                line=line,
                field=f"agents.{agent}",
            )
    return found


def _load_rules(path: Path) -> ScriptRules:
    from pydantic import ValidationError

    from corral.router import ScriptError, load_rules

    try:
        return load_rules(path)
    except ScriptError as exc:
        cause = exc.__cause__
        line: int | None = None
        detail = str(cause or exc)
        if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
            line, detail = cause.problem_mark.line + 1, f"invalid YAML: {cause.problem}"
        elif isinstance(cause, ValidationError) and cause.errors():
            first = cause.errors()[0]
            line = _line_of(path, tuple(first["loc"]))
            field = ".".join(str(part) for part in first["loc"])
            detail = f"{field}: {first['msg']}"
        raise ConfigError(f"{path}:{line or 1}: {detail}", path=str(path), line=line) from exc


def _check_keys(settings: Settings) -> Checked:
    for tier in settings.model_tiers():
        problem = model_key_problem(settings, tier)
        if problem is not None:
            raise problem
    models = settings.config.models
    named = sorted({models[t].api_key_env or "" for t in settings.model_tiers()} - {""})
    return Checked("model keys", f"set: {', '.join(named)}" if named else "none needed")


def _code_error(exc: BaseException, what: str) -> ConfigError:
    """``exc``, raised by a team's own code, as a ``ConfigError`` at the line that raised it
    (a syntax error's own, else the deepest frame outside corral and the installed packages)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        path, line = exc.filename, exc.lineno
    else:
        stack = traceback.extract_tb(exc.__traceback__)
        frames = [f for f in stack if _users(f.filename)] or list(stack)
        path, line = (frames[-1].filename, frames[-1].lineno) if frames else ("(tools)", None)
    return ConfigError(
        f"{path}:{line or 1}: {what}: {type(exc).__name__}: {exc}", path=path, line=line or None
    )


def _users(filename: str) -> bool:
    """Whether ``filename`` is a team's own code (not corral's, the standard library's or
    an installed package's)."""
    if filename.startswith("<"):
        return False
    own = Path(__file__).resolve().parents[2]
    resolved = Path(filename).resolve()
    installed = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix)]
    return not any(resolved.is_relative_to(p) for p in installed) and not (
        resolved.is_relative_to(own) and "examples" not in resolved.relative_to(own).parts
    )


def _line_of(path: Path, loc: tuple[Any, ...]) -> int:
    """The line of ``loc`` in the YAML file ``path`` (1 if it cannot be read)."""
    from corral.supervisor.config._config import _line_of as line_in

    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return 1
    return line_in(root, loc)


def _is_file(instructions: str) -> bool:
    """Whether an agent's ``instructions`` name a file (as ``load_config`` reads them)."""
    return "\n" not in instructions and Path(instructions).suffix in {".md", ".txt"}

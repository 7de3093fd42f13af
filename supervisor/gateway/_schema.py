"""What Cedar knows of a team's tools before any call: the schema derived from their
declarations, the action entities, and the policies checked against both.

From each tool (``Tool.resource_type``, ``fact_types``, ``groups``, ``irreversible``):

- the entity types: ``Agent`` (every principal), ``Customer`` (every ``context.customer``),
  each tool's resource type with its attributes and the types of its parents;
- the action ``<tool>``: it applies to an ``Agent`` on the tool's resource type, with a
  context of the tool's facts plus ``irreversible`` (Boolean) and ``customer`` (Customer);
  a member of the tool's groups and, when irreversible, of ``Action::"irreversible"``;
- the action ``<tool>:approve`` (the approval pass), with the same context: a member of
  ``Action::"<tool>"`` (and so of every group the tool is in) and of ``Action::"approval"``.
  ``action in Action::"refund"`` is both passes of the tool; ``action == Action::"refund"``
  the direct call alone. A forbid on a tool or a group therefore holds in both passes;
- each group (``Action::"<group>"``, and the built-in ``approval`` and ``irreversible``) as an
  action of no request.

The schema and each tool's action entities are built once, when the policies are bound to the
tools; per call only the resource's entity is added (``PolicyEngine.decide``), with only the
attributes some policy reads (``reads``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cedarpy

from corral.supervisor.gateway._policy_files import Policy, PolicyError, PolicyFile, line_of
from corral.supervisor.gateway._tools import CUSTOMER, AttributeType, EntityType, Tool, type_name

APPROVE_SUFFIX = ":approve"
"""Appended to a tool name to form the approval-pass action."""
APPROVAL_GROUP = "approval"
"""``Action::"approval"``: the group every approval-pass action belongs to."""
IRREVERSIBLE_GROUP = "irreversible"
"""``Action::"irreversible"``: the group of every tool that changes state and has no undo."""
AGENT = "Agent"
"""The principal's entity type."""
RESERVED_FACTS = ("customer", "irreversible")
"""Context keys the engine sets on every call; no tool declares them."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PRIMITIVES: dict[object, str] = {bool: "Boolean", int: "Long", str: "String"}


@dataclass(frozen=True)
class Declarations:
    """The tools as Cedar sees them, worked out once."""

    schema: dict[str, Any]
    """The Cedar schema, in its JSON form."""
    handle: cedarpy.Schema
    entities: Mapping[str, cedarpy.Entities]
    """Each tool's action entities (its two actions and their groups: all Cedar reads of the
    actions of a call of it): the entities of a call whose resource has no attributes or
    parents; a call's resource entity is added to them."""
    ancestors: Mapping[str, frozenset[str]]
    """Each tool's actions and the groups they are in, both passes: what a policy's scope
    must name for the policy to apply to a call of the tool."""
    resource_types: Mapping[str, str]
    """Each tool's resource type."""
    irreversible: frozenset[str]
    actions: frozenset[str]
    """Every action the schema declares: tools, approval passes and groups."""
    groups: frozenset[str]
    empty_groups: frozenset[str]
    """Built-in groups no tool is in: a policy on one applies to nothing, and is no error."""
    facts: Mapping[str, tuple[str, ...]]
    """Each action's context keys."""
    attributes: Mapping[str, tuple[str, ...]]
    """Each entity type's attributes."""
    fingerprint: str
    """The schema as text: equal declarations, equal fingerprints."""


def declare(tools: Iterable[Tool[Any]]) -> Declarations:
    """The Cedar view of ``tools``.

    Raises:
        PolicyError: A declaration Cedar cannot take: a tool or group name with ``:`` or
            reserved, a group named like a tool, a fact named ``customer`` or ``irreversible``,
            an unsupported attribute type, or two tools declaring one entity type differently.
    """
    tools = list(tools)
    types = _entity_types(tools)
    names = {tool.name for tool in tools}
    actions: dict[str, dict[str, Any]] = {}
    irreversible: set[str] = set()
    groups = {APPROVAL_GROUP, IRREVERSIBLE_GROUP}
    for tool in tools:
        context = _context(tool)
        resource_type = type_name(tool.resource_type)
        applies = {"principalTypes": [AGENT], "resourceTypes": [resource_type], "context": context}
        member_of = list(dict.fromkeys(_groups(tool, names)))
        if tool.irreversible:
            irreversible.add(tool.name)
            member_of.append(IRREVERSIBLE_GROUP)
        groups.update(member_of)
        actions[tool.name] = {"memberOf": [{"id": g} for g in member_of], "appliesTo": applies}
        actions[tool.name + APPROVE_SUFFIX] = {
            "memberOf": [{"id": tool.name}, {"id": APPROVAL_GROUP}],
            "appliesTo": applies,
        }
    for group in sorted(groups):
        actions[group] = {}
    schema = {"": {"entityTypes": _entity_types_json(types), "actions": actions}}
    text = json.dumps(schema, sort_keys=True)
    ancestors = {
        tool.name: frozenset(
            (
                tool.name,
                tool.name + APPROVE_SUFFIX,
                APPROVAL_GROUP,
                *(g["id"] for g in actions[tool.name]["memberOf"]),
            )
        )
        for tool in tools
    }
    try:
        handle = cedarpy.Schema.from_json_str(text)
        entities = {
            tool: cedarpy.Entities.from_json_str(json.dumps(_action_entities(actions, names)))
            for tool, names in ancestors.items()
        }
    except ValueError as exc:
        raise PolicyError(f"the tools' declarations make no Cedar schema: {exc}") from exc
    used = {g["id"] for action in actions.values() for g in action.get("memberOf", ())}
    return Declarations(
        schema=schema,
        handle=handle,
        entities=entities,
        ancestors=ancestors,
        resource_types={tool.name: type_name(tool.resource_type) for tool in tools},
        irreversible=frozenset(irreversible),
        actions=frozenset(actions),
        groups=frozenset(groups),
        empty_groups=frozenset(groups - used),
        facts={
            name: tuple(action["appliesTo"]["context"]["attributes"])
            for name, action in actions.items()
            if "appliesTo" in action
        },
        attributes={name: tuple(t.attributes) for name, t in types.items()},
        fingerprint=text,
    )


def _groups(tool: Tool[Any], tools: set[str]) -> Iterable[str]:
    for group in tool.groups:
        if not group or ":" in group or group in tools or group == IRREVERSIBLE_GROUP:
            why = "is a tool's name" if group in tools else "is reserved or contains ':'"
            raise PolicyError(f"tool {tool.name}: group {group!r} {why}")
        yield group


def _context(tool: Tool[Any]) -> dict[str, Any]:
    name = tool.name
    if not name or ":" in name or name in (APPROVAL_GROUP, IRREVERSIBLE_GROUP):
        raise PolicyError(f"tool name {name!r} is reserved or contains ':'")
    attributes: dict[str, Any] = {}
    for fact, fact_type in tool.fact_types.items():
        if fact in RESERVED_FACTS:
            raise PolicyError(
                f"tool {name}: fact {fact!r} is set by the gateway; a tool declares no {fact!r}"
            )
        attributes[fact] = _cedar_type(fact_type, f"tool {name}: fact {fact!r}")
    attributes["irreversible"] = {"type": "Boolean"}
    attributes["customer"] = {"type": "Entity", "name": CUSTOMER.name}
    return {"type": "Record", "attributes": attributes}


def _cedar_type(declared: AttributeType, what: str) -> dict[str, Any]:
    if isinstance(declared, EntityType):
        return {"type": "Entity", "name": declared.name}
    primitive = _PRIMITIVES.get(declared)
    if primitive is None:
        raise PolicyError(f"{what}: type {declared!r} is none of int, bool, str or an EntityType")
    return {"type": primitive}


def _entity_types(tools: Sequence[Tool[Any]]) -> dict[str, EntityType]:
    """Every entity type the tools name, by name (a bare name is a type of no attributes,
    unless some tool declares more)."""
    types: dict[str, EntityType] = {CUSTOMER.name: CUSTOMER}
    declared_by: dict[str, str] = {}

    def add(declared: EntityType | str, who: str) -> None:
        entity = EntityType(declared) if isinstance(declared, str) else declared
        if not _NAME.fullmatch(entity.name) or entity.name in (AGENT, "Action"):
            raise PolicyError(f"{who}: entity type {entity.name!r} is reserved or not a Cedar name")
        known = types.get(entity.name)
        bare = not entity.attributes and not entity.parents
        if known is not None and (bare or known == entity):
            return
        if known is not None and (known.attributes or known.parents):
            raise PolicyError(
                f"{who} declares entity type {entity.name} unlike {declared_by[entity.name]}: one"
                " type, one declaration (share the EntityType)"
            )
        types[entity.name] = entity
        declared_by[entity.name] = who
        for attribute in entity.attributes.values():
            if isinstance(attribute, EntityType):
                add(attribute, who)
        for parent in entity.parents:
            add(parent, who)

    for tool in tools:
        add(tool.resource_type, f"tool {tool.name}")
        for fact_type in tool.fact_types.values():
            if isinstance(fact_type, EntityType):
                add(fact_type, f"tool {tool.name}")
    return types


def _entity_types_json(types: Mapping[str, EntityType]) -> dict[str, Any]:
    document: dict[str, Any] = {AGENT: {}}
    for name, entity in sorted(types.items()):
        declared: dict[str, Any] = {}
        if entity.parents:
            declared["memberOfTypes"] = sorted({parent.name for parent in entity.parents})
        if entity.attributes:
            declared["shape"] = {
                "type": "Record",
                "attributes": {
                    attribute: _cedar_type(attribute_type, f"entity type {name}: attribute {attribute!r}")
                    for attribute, attribute_type in entity.attributes.items()
                },
            }
        document[name] = declared
    return document


def _action_entities(actions: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> list[dict[str, Any]]:
    return [
        {
            "uid": {"type": "Action", "id": name},
            "attrs": {},
            "parents": [{"type": "Action", "id": group["id"]} for group in actions[name].get("memberOf", ())],
        }
        for name in sorted(names)
    ]


@dataclass(frozen=True)
class Reads:
    """What the policies read of a call, so that a call carries nothing more to Cedar (an
    entity reference costs Cedar microseconds to parse; a missing key a policy reads would
    only fail closed)."""

    customer: frozenset[str]
    """The tools some policy that may apply to them reads ``.customer`` for."""
    attributes: frozenset[str]
    """Every attribute name a policy reads (``resource.total_cents``, ``... has owner``)."""


def reads(files: Sequence[PolicyFile], declared: Declarations) -> Reads:
    """What the policies read, by their scopes and the attributes their conditions name."""
    customer: set[str] = set()
    attributes: set[str] = set()
    for policy in (policy for file in files for policy in file.policies):
        read = set(_attributes_read(policy.json))
        attributes |= read
        if "customer" in read:
            scope = policy.json.get("action", {})
            named = set(_actions_named(scope))
            for tool, ancestors in declared.ancestors.items():
                op = scope.get("op")
                if op == "==":
                    applies = bool(named & {tool, tool + APPROVE_SUFFIX})
                else:  # in a group or a tool (or whatever else: then every tool, to be safe)
                    applies = bool(named & ancestors) if op == "in" else True
                if applies:
                    customer.add(tool)
    return Reads(frozenset(customer), frozenset(attributes))


def _attributes_read(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in (".", "has") and isinstance(value, dict) and isinstance(value.get("attr"), str):
                yield value["attr"]
            yield from _attributes_read(value)
    elif isinstance(node, list):
        for value in node:
            yield from _attributes_read(value)


# --- the policies checked against the schema ---------------------------------------------------

_POLICY_PREFIX = re.compile(r"^for policy `[^`]*`, ")
_NO_FACT = re.compile(
    r'attribute `(?P<name>[^`]*)` in context for Action::"(?P<action>(?:[^"\\]|\\.)*)" not found'
)
_NO_ATTRIBUTE = re.compile(r"attribute `(?P<name>[^`]*)` on entity type `(?P<type>[^`]*)` not found")
_NO_ACTION = re.compile(r'unrecognized action `Action::"(?P<action>(?:[^"\\]|\\.)*)"`')
_NO_TYPE = re.compile(r"unrecognized entity type `(?P<type>[^`]*)`")
_NO_REQUEST = "unable to find an applicable action given the policy scope constraints"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one policy, where it is."""

    policy: Policy
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.policy.file}:{self.line}" if self.line is not None else str(self.policy.file)
        return f"{where}: policy {self.policy.id}: {self.message}"


def check(files: Sequence[PolicyFile], declared: Declarations, *, strict: bool) -> None:
    """Validate every policy against the schema (Cedar's strict validation: every action,
    entity type, attribute and fact a policy names exists, with the type it is used at).

    Args:
        files: The policy files.
        declared: The tools' declarations.
        strict: A policy naming an action no tool declares is an error (a misspelled tool or
            group). Not strict (a gateway serving some of a team's tools, as tests build):
            such a policy is left unchecked, and applies to no call.

    Raises:
        PolicyError: Naming the file, the line and the policy of the first problem; its
            message lists every problem, one a line.
    """
    problems = [problem for file in files for problem in _problems(file, declared, strict)]
    if problems:
        first = problems[0]
        raise PolicyError(
            "\n".join(str(problem) for problem in problems),
            file=str(first.policy.file),
            policy_id=first.policy.id,
            line=first.line,
        )


def _problems(file: PolicyFile, declared: Declarations, strict: bool) -> Iterable[Problem]:
    result = cedarpy.validate_policies(file.text, declared.handle)
    if result.validation_passed:
        return
    errors: dict[int, list[str]] = {}
    for error in result.errors:
        position = int(error.policy_id.removeprefix("policy")) if error.policy_id else 0
        errors.setdefault(position, []).append(_POLICY_PREFIX.sub("", error.error))
    for position, messages in sorted(errors.items()):
        policy = file.policies[position]
        named = set(_actions_named(policy.json))
        if not strict and named - declared.actions:
            continue  # about a tool this gateway does not serve
        if _NO_REQUEST in messages and (len(set(messages)) > 1 or named & declared.empty_groups):
            messages = [message for message in messages if message != _NO_REQUEST]
        seen: set[str] = set()
        for message in messages:
            explained, names = _explain(message, declared)
            if explained not in seen:
                seen.add(explained)
                yield Problem(policy, line_of(policy, names), explained)


def _actions_named(node: Any) -> Iterable[str]:
    """The ids of the actions a policy's JSON names (in its scope or its conditions)."""
    if isinstance(node, dict):
        if node.get("type") == "Action" and isinstance(node.get("id"), str):
            yield node["id"]
        for value in node.values():
            yield from _actions_named(value)
    elif isinstance(node, list):
        for value in node:
            yield from _actions_named(value)


def _explain(message: str, declared: Declarations) -> tuple[str, list[str]]:
    """Cedar's validation message said for a policy's author, and the names to point at."""
    if match := _NO_FACT.search(message):
        name, action = match["name"], match["action"].removesuffix(APPROVE_SUFFIX)
        facts = declared.facts.get(action, ())
        return f"context.{name} is not a fact of {action}{_hint(name, facts, 'its facts')}", [name]
    if match := _NO_ATTRIBUTE.search(message):
        name, entity = match["name"], match["type"]
        attributes = declared.attributes.get(entity, ())
        return f"{entity} has no attribute {name}{_hint(name, attributes, 'its attributes')}", [name]
    if match := _NO_ACTION.search(message):
        action = match["action"]
        hint = _hint(action, sorted(declared.actions), "actions")
        return f'Action::"{action}" is no tool, approval pass or group{hint}', [f'Action::"{action}"']
    if match := _NO_TYPE.search(message):
        entity = match["type"]
        types = sorted({AGENT, *declared.attributes})
        return f"there is no entity type {entity}{_hint(entity, types, 'types')}", [f"{entity}::", entity]
    if message == _NO_REQUEST:
        return "it applies to no call: no action in its scope has such a principal and resource", []
    return message, []


def _hint(name: str, known: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" ({what}: {', '.join(known)})" if known else ""

"""The policy engine: Cedar decides every tool call the gateway sees.

A tool call becomes one Cedar request: principal ``Agent::"<agent>"``, action ``Action::"<tool>"``,
resource ``<resource_type>::"<resource_id>"`` (an entity with the attributes and parents the tool
names) and a context of JSON values: the facts the tool looks up (money in integer cents, because
Cedar has no decimals), ``irreversible`` and ``customer`` (the acting ``Customer``), which the
engine sets on every call.

Three outcomes from two passes:

1. **Direct.** The request is evaluated as ``Action::"<tool>"``. Allowed → ``allow``, with the ids of
   the permits that allowed it.
2. **With approval.** Otherwise the same request is evaluated as ``Action::"<tool>:approve"``, which
   means "may proceed once someone approves". Allowed → ``approval``. Each permit that allowed it
   names its approver with an annotation, ``@approver("account_manager")`` (a role, i.e. an agent)
   or ``@approver("human")``; a permit without one needs a human. When the determining permits
   disagree, the most privileged approver wins: any ``human`` (or two different roles) → ``human``.
   The decision's ids are the forbids that refused the direct call, then the permits naming the
   chosen approver.
3. Otherwise ``deny``, with the ids of the forbids that fired in either pass (and their
   ``@reason("...")``, if they give one), or no ids and the reason "no policy permits <agent> to <tool>".

Actions and groups (``supervisor.gateway._schema``): ``Action::"<tool>:approve"`` is a member of
``Action::"<tool>"``, and so of every group the tool declares, and of ``Action::"approval"``. So
``action in Action::"refund"`` (or ``in Action::"customer_owned"``, a group) covers both passes: a
forbid written so holds for the approval path too, while ``action == Action::"refund"`` is the
direct call alone. A policy singles out the approval pass with ``action in Action::"approval"``:
``forbid (principal, action in Action::"irreversible", resource) unless { action in Action::"approval" };``
refuses irreversible calls directly but leaves them approvable.

The policies are checked when they are bound to the tools (:meth:`PolicyEngine.load` with tools,
:meth:`PolicyEngine.bind`, :func:`check_policy_files`): against the Cedar schema derived from the
tools' declarations, so that a misspelled fact, attribute, tool or group is an error naming the
file and the line, not a call denied at run time.

Policy ids: every policy carries ``@id("P-45")``, unique across the directory. Cedar itself numbers
policies by position (``policy0``, ...), so the engine rebuilds the set keyed by the ``@id`` values:
Cedar's own diagnostics then report ``P-45`` directly, with no mapping on the hot path.

Cedar skips a policy whose evaluation fails (a missing context key, an overflow); for a forbid that
would mean allowing what it was written to stop. The engine fails closed instead: any evaluation
error denies the call, naming the policy.

An approval never reaches the policies: when the outcome is ``approval`` and an approval of
that exact action has been granted, the gateway consumes it and proceeds.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cedarpy
import msgspec

from corral.supervisor.errors import ConfigError
from corral.supervisor.gateway._policy_files import HUMAN, PolicyError, PolicyFile, read_policies
from corral.supervisor.gateway._schema import (
    APPROVAL_GROUP,
    APPROVE_SUFFIX,
    Declarations,
    Reads,
    check,
    declare,
    reads,
)
from corral.supervisor.gateway._tools import CUSTOMER, EntityRef, Tool

__all__ = [
    "APPROVAL_GROUP",
    "APPROVE_SUFFIX",
    "HUMAN",
    "PolicyDecision",
    "PolicyEngine",
    "PolicyError",
    "PolicyRequest",
    "check_policy_files",
]

logger = logging.getLogger(__name__)

_ERROR_POLICY = re.compile(r"policy `([^`]*)`")


@dataclass(frozen=True, kw_only=True)
class PolicyRequest:
    """One tool call, as the gateway presents it to the engine.

    Context keys the sample policies read: ``amount_cents`` (int), ``account_age_days`` (int),
    ``refunds_today_cents`` (int: the customer's refunds today before this one), and the two the
    engine sets on every call, ``irreversible`` and ``customer``.
    A key a relevant policy reads but the context lacks denies the call.
    """

    principal: str
    """The agent's name."""
    action: str
    """The tool's name."""
    resource_type: str
    """The Cedar entity type of the object touched, e.g. ``Order``: the one the tool declares."""
    resource_id: str
    """Its id, e.g. ``"77"``."""
    context: Mapping[str, Any]
    """JSON values only: ints, bools, strings (and lists/records of them, ``EntityRef``); no
    floats, no None. ``irreversible`` and ``customer`` are the engine's: set whatever this holds."""
    customer: str = ""
    """The acting customer (``context.customer``); "": the conversation has none."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """The resource's attributes (``resource.owner``), of the JSON values above."""
    parents: tuple[EntityRef, ...] = ()
    """The resource's parents (``resource in Customer::"cus_1001"``)."""


@dataclass(frozen=True)
class PolicyDecision:
    """The engine's answer, shown to the agent, the trace and the client."""

    outcome: Literal["allow", "deny", "approval"]
    policy_ids: tuple[str, ...]
    """The ``@id`` values of the policies behind the outcome."""
    approver: str | None
    """For ``approval``: ``"human"`` or a role such as ``"account_manager"``; otherwise None."""
    reason: str
    """Human-readable; names the policy ids."""


@dataclass(frozen=True)
class _Pass:
    allowed: bool
    reasons: tuple[str, ...]
    errors: tuple[str, ...]


class PolicyEngine:
    """Decides tool calls against a fixed set of Cedar policies, bound to the tools they govern.

    Build it with :meth:`load`; :meth:`decide` is cheap and safe to call from any thread.

    Args:
        files: The policy files, their policies in load order.
        policy_set: The parsed policies, keyed by their ``@id``.
        declared: The tools' declarations (None: not bound yet; :meth:`bind`).
        strict: The policies were checked strictly against them.
    """

    def __init__(
        self,
        files: Sequence[PolicyFile],
        policy_set: cedarpy.PolicySet,
        declared: Declarations | None = None,
        *,
        strict: bool = False,
    ) -> None:
        self._files = tuple(files)
        self._strict = strict
        self._policy_set = policy_set
        self._policies = {policy.id: policy for file in files for policy in file.policies}
        self._order = {policy_id: index for index, policy_id in enumerate(self._policies)}
        self._declared = declared
        self._reads = reads(files, declared) if declared is not None else Reads(frozenset(), frozenset())

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """Every loaded policy id, in load order."""
        return tuple(self._policies)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The Cedar schema (JSON form) the policies were checked against; None until bound."""
        return self._declared.schema if self._declared is not None else None

    @classmethod
    def load(
        cls, directory: Path, tools: Iterable[Tool[Any]] | None = None, *, strict: bool = True
    ) -> PolicyEngine:
        """Load every ``*.cedar`` file of ``directory``, in name order; with ``tools``, bind
        the policies to them (:meth:`bind`). The supervisor's start calls this with its tools.

        Args:
            directory: The policy directory, e.g. ``examples/support/policies``.
            tools: The tools the policies govern (None: bind later; the gateway binds its own).
            strict: See :meth:`bind`.

        Returns:
            The engine.

        Raises:
            PolicyError: A file cannot be read or parsed, a policy lacks ``@id`` or repeats one,
                an ``@approver`` is empty or on a forbid, a ``@reason`` on a permit, a file
                holds a template, or the directory holds no policy at all; with ``tools``, what
                :meth:`bind` raises.
        """
        files = read_policies(directory)
        static = {policy.id: policy.json for file in files for policy in file.policies}
        document = json.dumps({"staticPolicies": static, "templates": {}, "templateLinks": []})
        try:
            policy_set = cedarpy.PolicySet.from_json_str(document)
        except ValueError as exc:  # each file parsed alone, so only a cross-file problem lands here
            raise PolicyError(f"{directory}: the policy set is invalid: {exc}", file=str(directory)) from exc
        logger.debug("loaded %d policies from %d files in %s", len(static), len(files), directory)
        engine = cls(files, policy_set)
        return engine if tools is None else engine.bind(tools, strict=strict)

    def bind(self, tools: Iterable[Tool[Any]], *, strict: bool = True) -> PolicyEngine:
        """The engine for ``tools``: its schema and action entities built, its policies checked
        against them (this engine, if it is already bound to the same declarations).

        Args:
            tools: The tools the policies govern.
            strict: A policy naming an action none of ``tools`` declares (a misspelled tool or
                group) is an error. Not strict (a gateway serving some of a team's tools): such
                a policy applies to no call, and is left unchecked.

        Raises:
            PolicyError: A declaration Cedar cannot take, or a policy that does not validate
                against the schema (the first problem's file, line and policy id on the error;
                every problem in its message).
        """
        declared = declare(tools)
        same = self._declared is not None and self._declared.fingerprint == declared.fingerprint
        if same and (self._strict or not strict):
            return self
        check(self._files, declared, strict=strict)
        return PolicyEngine(self._files, self._policy_set, declared, strict=strict)

    def decide(self, request: PolicyRequest) -> PolicyDecision:
        """Decide one tool call: allow it, deny it, or let it proceed once someone approves.

        Args:
            request: The call.

        Returns:
            The decision, with the ids of the policies behind it.

        Raises:
            PolicyError: The engine is not bound to tools, or the request itself is malformed
                (a tool name that is an approval pass or a group, a context value or attribute
                Cedar cannot represent such as a float or None).
        """
        declared = self._declared
        if declared is None:
            raise PolicyError("the policies are not bound to the tools (PolicyEngine.bind)")
        tool = request.action
        refusal = self._undeclared(request, declared)
        if refusal is not None:
            return self._log(request, PolicyDecision("deny", (), None, refusal))
        base, entities = self._cedar_request(request, declared)

        direct = self._evaluate(base, tool, entities)
        if direct.errors:
            return self._failed(request, direct)
        if direct.allowed:
            return self._log(
                request, PolicyDecision("allow", direct.reasons, None, f"allowed by {_ids(direct.reasons)}")
            )

        approve = self._evaluate(base, tool + APPROVE_SUFFIX, entities)
        if approve.errors:
            return self._failed(request, approve)
        refused_by = direct.reasons  # a Deny's reasons are the forbids that fired, if any
        if approve.allowed:
            approver = self._approver(approve.reasons)
            granted = tuple(r for r in approve.reasons if self._policies[r].approver == approver)
            granted = granted or approve.reasons
            why = f"forbidden directly by {_ids(refused_by)}; " if refused_by else ""
            reason = f"{tool} needs approval by {approver}: {why}approvable under {_ids(granted)}"
            return self._log(
                request, PolicyDecision("approval", _unique(refused_by + granted), approver, reason)
            )

        forbids = _unique(approve.reasons + refused_by)
        if forbids:
            said = dict.fromkeys(self._policies[f].reason for f in forbids if f in self._policies)
            said.pop("", None)
            because = f" ({'; '.join(said)})" if said else ""
            reason = f"{request.principal} may not {tool}: forbidden by {_ids(forbids)}{because}"
        else:
            reason = f"no policy permits {request.principal} to {tool}"
        return self._log(request, PolicyDecision("deny", forbids, None, reason))

    @staticmethod
    def _undeclared(request: PolicyRequest, declared: Declarations) -> str | None:
        """Why a call the declarations do not cover is denied (None: they cover it)."""
        tool = request.action
        expected = declared.resource_types.get(tool)
        if expected is None:
            if ":" in tool or tool in declared.groups:
                raise PolicyError(f"tool name {tool!r} is reserved or contains ':'")
            return f"{request.principal} may not {tool}: the policies know no tool {tool}"
        if request.resource_type != expected:
            return (
                f"{tool} denied: it names a {request.resource_type}; its declared resource type is {expected}"
            )
        return None

    def _cedar_request(
        self, request: PolicyRequest, declared: Declarations
    ) -> tuple[dict[str, Any], cedarpy.Entities]:
        """Cedar's request for both passes (but the action), and its entities: the tool's
        actions, built once, and the resource's entity, the one built per call."""
        tool = request.action
        context = {key: _cedar(value) for key, value in request.context.items()}
        context["irreversible"] = tool in declared.irreversible
        if tool in self._reads.customer:  # else no policy reads it: not parsed for nothing
            context["customer"] = {"__entity": {"type": CUSTOMER.name, "id": request.customer}}
        else:
            context.pop("customer", None)
        resource = {"type": request.resource_type, "id": request.resource_id}
        base: dict[str, Any] = {
            "principal": {"type": "Agent", "id": request.principal},
            "resource": resource,
            # Serialized once for both passes (cedarpy would dump a dict on every call).
            "context": _dumps(context, tool),
        }
        entities = declared.entities[tool]
        read = self._reads.attributes
        attributes = {name: _cedar(value) for name, value in request.attributes.items() if name in read}
        if attributes or request.parents:
            parents = [{"type": parent.type, "id": parent.id} for parent in request.parents]
            entity = {"uid": resource, "attrs": attributes, "parents": parents}
            try:
                entities = entities.with_added_json_str(_dumps([entity], tool))
            except ValueError as exc:
                raise PolicyError(f"{tool}: its resource cannot be an entity: {exc}") from exc
        return base, entities

    def _evaluate(self, base: dict[str, Any], action: str, entities: cedarpy.Entities) -> _Pass:
        result = cedarpy.is_authorized(
            {**base, "action": {"type": "Action", "id": action}}, self._policy_set, entities
        )
        diagnostics = result.diagnostics
        if result.decision is cedarpy.Decision.NoDecision:
            raise PolicyError(f"{action} cannot be evaluated: {'; '.join(diagnostics.errors)}")
        # Cedar reports reasons as a set; load order makes decisions reproducible.
        reasons = tuple(sorted(diagnostics.reasons, key=lambda r: self._order.get(r, len(self._order))))
        return _Pass(result.allowed, reasons, tuple(diagnostics.errors))

    def _approver(self, permit_ids: Sequence[str]) -> str:
        approvers = {self._policies[p].approver for p in permit_ids}
        if len(approvers) == 1:
            return approvers.pop()
        return HUMAN  # a human among them, or roles that disagree: escalate to the one who outranks all

    def _failed(self, request: PolicyRequest, evaluation: _Pass) -> PolicyDecision:
        culprits = _unique(tuple(m.group(1) for e in evaluation.errors if (m := _ERROR_POLICY.search(e))))
        reason = f"{request.action} denied: a policy could not be evaluated: {'; '.join(evaluation.errors)}"
        logger.warning(
            "policy evaluation failed for %s calling %s: %s",
            request.principal,
            request.action,
            "; ".join(evaluation.errors),
        )
        return self._log(request, PolicyDecision("deny", culprits, None, reason))

    @staticmethod
    def _log(request: PolicyRequest, decision: PolicyDecision) -> PolicyDecision:
        logger.debug("%s %s -> %s (%s)", request.principal, request.action, decision.outcome, decision.reason)
        return decision


def check_policy_files(directory: Path, tools: Iterable[Tool[Any]]) -> None:
    """Check a policy directory against the tools it governs, as the supervisor's start does
    (``corral validate`` calls this): every file parses, every policy has its ``@id``, and
    every policy validates against the Cedar schema of ``tools`` (strictly: a policy naming
    a tool or group that does not exist is an error too).

    Args:
        directory: The policy directory.
        tools: The team's tools.

    Raises:
        ConfigError: The first problem's file (``path``), line (``line``) and policy id
            (``field``); the message names them and lists every problem found, one a line.
    """
    try:
        PolicyEngine.load(directory, tools, strict=True)
    except PolicyError as exc:
        raise ConfigError(
            str(exc), path=exc.file or str(directory), line=exc.line, field=exc.policy_id
        ) from exc


def _cedar(value: Any) -> Any:
    """A fact's or attribute's value in Cedar's JSON: an ``EntityRef`` as ``__entity``."""
    if isinstance(value, EntityRef):
        return {"__entity": {"type": value.type, "id": value.id}}
    if isinstance(value, list | tuple | set | frozenset):
        return [_cedar(item) for item in value]
    if isinstance(value, dict):
        return {key: _cedar(item) for key, item in value.items()}
    return value


_json = msgspec.json.Encoder()


def _dumps(value: object, tool: str) -> str:
    try:
        return _json.encode(value).decode()
    except (TypeError, ValueError) as exc:  # msgspec.EncodeError is a ValueError
        raise PolicyError(f"{tool}: a fact or attribute Cedar cannot represent: {exc}") from exc


def _unique(ids: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def _ids(ids: Sequence[str]) -> str:
    return ", ".join(ids) if ids else "no policy"

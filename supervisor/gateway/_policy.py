"""The policy engine: Cedar decides every tool call the gateway sees.

A tool call becomes one Cedar request: principal ``Agent::"<agent>"``, action ``Action::"<tool>"``,
resource ``<resource_type>::"<resource_id>"`` and a context of JSON values (arguments plus facts the
gateway looks up; money in integer cents, because Cedar has no decimals).

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
3. Otherwise ``deny``, with the ids of the forbids that fired in either pass, or no ids and the reason
   "no policy permits <agent> to <tool>".

Every ``Action::"<tool>:approve"`` is a member of the group ``Action::"approval"``, so a policy can
single out the approval pass generically: ``forbid (...) when { context.irreversible } unless
{ action in Action::"approval" };`` refuses irreversible calls directly but leaves them approvable.
A forbid that must hold in both passes names both actions:
``action in [Action::"refund", Action::"refund:approve"]``.

Policy ids: every policy carries ``@id("P-45")``, unique across the directory. Cedar itself numbers
policies by position (``policy0``, ...), so :meth:`PolicyEngine.load` converts each file to Cedar's
JSON form and rebuilds the set keyed by the ``@id`` values: Cedar's own diagnostics then report
``P-45`` directly, with no mapping on the hot path.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cedarpy

from corral.bus.errors import CorralError

logger = logging.getLogger(__name__)

APPROVE_SUFFIX = ":approve"
"""Appended to a tool name to form the approval-pass action."""
APPROVAL_GROUP = "approval"
"""``Action::"approval"``: the group every approval-pass action belongs to."""
HUMAN = "human"
"""The approver that outranks every role."""

_MAX_CACHED_TOOLS = 1024
_ERROR_POLICY = re.compile(r"policy `([^`]*)`")
_ID_ANNOTATION = re.compile(r'@id\s*\(\s*"((?:[^"\\]|\\.)*)"')


class PolicyError(CorralError):
    """A policy file is invalid, or a request cannot be evaluated at all.

    Args:
        message: The full, human-readable message (names the file and line when known).
        file: The policy file (or directory), if the error is about one.
        policy_id: The ``@id`` of the offending policy, if known.
        line: 1-based line where the offending policy starts, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        policy_id: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.policy_id = policy_id
        self.line = line
        self.retryable = False


@dataclass(frozen=True, kw_only=True)
class PolicyRequest:
    """One tool call, as the gateway presents it to the engine.

    Context keys the sample policies read: ``amount_cents`` (int), ``account_age_days`` (int),
    ``owns_resource`` (bool: the order or subscription belongs to the acting customer),
    ``refunds_today_cents`` (int: the customer's refunds today before this one), ``irreversible``
    (bool; read for every tool, so always present).
    A key a relevant policy reads but the context lacks denies the call.
    """

    principal: str
    """The agent's name."""
    action: str
    """The tool's name."""
    resource_type: str
    """The Cedar entity type of the object touched, e.g. ``Order``."""
    resource_id: str
    """Its id, e.g. ``"77"``."""
    context: Mapping[str, Any]
    """JSON values only: ints, bools, strings (and lists/records of them); no floats, no None."""


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
class _Policy:
    id: str
    effect: Literal["permit", "forbid"]
    approver: str
    """For permits: who must approve when this permit allows an approval-pass action."""


@dataclass(frozen=True)
class _Pass:
    allowed: bool
    reasons: tuple[str, ...]
    errors: tuple[str, ...]


class PolicyEngine:
    """Decides tool calls against a fixed set of Cedar policies.

    Build it with :meth:`load`; :meth:`decide` is cheap and safe to call from any thread.

    Args:
        policy_set: The parsed policies, keyed by their ``@id``.
        policies: Effect and approver of each policy, by id.
    """

    def __init__(self, policy_set: cedarpy.PolicySet, policies: Mapping[str, _Policy]) -> None:
        self._policy_set = policy_set
        self._policies = dict(policies)
        self._order = {policy_id: index for index, policy_id in enumerate(self._policies)}
        self._entities: dict[str, cedarpy.Entities] = {}

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """Every loaded policy id, in load order."""
        return tuple(self._policies)

    @classmethod
    def load(cls, directory: Path) -> PolicyEngine:
        """Load every ``*.cedar`` file of ``directory``, in name order.

        Args:
            directory: The policy directory, e.g. ``examples/support/policies``.

        Returns:
            The engine.

        Raises:
            PolicyError: A file cannot be read or parsed, a policy lacks ``@id`` or repeats one,
                an ``@approver`` is empty or on a forbid, a file holds a template, or the directory
                holds no policy at all.
        """
        files = sorted(directory.glob("*.cedar"))
        if not files:
            raise PolicyError(f"{directory}: no *.cedar policy files", file=str(directory))
        static: dict[str, Any] = {}
        policies: dict[str, _Policy] = {}
        origin: dict[str, str] = {}
        for path in files:
            for policy_id, policy_json, policy in _load_file(path):
                if policy_id in origin:
                    raise PolicyError(
                        f"{path}: duplicate policy id {policy_id!r} (first defined in {origin[policy_id]})",
                        file=str(path),
                        policy_id=policy_id,
                    )
                origin[policy_id] = str(path)
                static[policy_id] = policy_json
                policies[policy_id] = policy
        document = json.dumps({"staticPolicies": static, "templates": {}, "templateLinks": []})
        try:
            policy_set = cedarpy.PolicySet.from_json_str(document)
        except ValueError as exc:  # each file parsed alone, so only a cross-file problem lands here
            raise PolicyError(f"{directory}: the policy set is invalid: {exc}", file=str(directory)) from exc
        logger.debug("loaded %d policies from %d files in %s", len(policies), len(files), directory)
        return cls(policy_set, policies)

    def decide(self, request: PolicyRequest) -> PolicyDecision:
        """Decide one tool call: allow it, deny it, or let it proceed once someone approves.

        Args:
            request: The call.

        Returns:
            The decision, with the ids of the policies behind it.

        Raises:
            PolicyError: The request itself is malformed (a tool name containing ``:``, a context
                value Cedar cannot represent such as a float or None).
        """
        tool = request.action
        if ":" in tool or tool == APPROVAL_GROUP:
            raise PolicyError(f"tool name {tool!r} is reserved or contains ':'")
        base: dict[str, Any] = {
            "principal": {"type": "Agent", "id": request.principal},
            "resource": {"type": request.resource_type, "id": request.resource_id},
            # Serialized once for both passes (cedarpy would dump a dict on every call).
            "context": json.dumps(dict(request.context)),
        }
        entities = self._entities_for(tool)

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
            reason = f"{request.principal} may not {tool}: forbidden by {_ids(forbids)}"
        else:
            reason = f"no policy permits {request.principal} to {tool}"
        return self._log(request, PolicyDecision("deny", forbids, None, reason))

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

    def _entities_for(self, tool: str) -> cedarpy.Entities:
        """The entity set for ``tool``: only its approval action, as a member of ``Action::"approval"``."""
        entities = self._entities.get(tool)
        if entities is None:
            document = [
                {
                    "uid": {"type": "Action", "id": tool + APPROVE_SUFFIX},
                    "attrs": {},
                    "parents": [{"type": "Action", "id": APPROVAL_GROUP}],
                }
            ]
            try:
                entities = cedarpy.Entities.from_json_str(json.dumps(document))
            except ValueError as exc:
                raise PolicyError(f"tool name {tool!r} cannot be an entity id: {exc}") from exc
            if len(self._entities) < _MAX_CACHED_TOOLS:  # tool names come from a registry; bound it anyway
                self._entities[tool] = entities
        return entities

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


def _load_file(path: Path) -> Iterator[tuple[str, Any, _Policy]]:
    """Parse one file; yield (id, Cedar JSON of the policy, its summary) in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read: {exc}", file=str(path)) from exc
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        line, policy_id = _locate_parse_error(text)
        where = f"{path}:{line}" if line is not None else str(path)
        named = f" (policy {policy_id})" if policy_id else ""
        raise PolicyError(
            f"{where}: Cedar parse error{named}: {exc}", file=str(path), policy_id=policy_id, line=line
        ) from exc
    if parsed.get("templates"):
        raise PolicyError(f"{path}: templates (?principal, ?resource) are not supported", file=str(path))
    starts = [line for line, _ in _statements(text)]
    for position, policy_json in enumerate(parsed["staticPolicies"].values()):
        # Cedar numbers policies in file order, the order the JSON object keeps.
        line = starts[position] if position < len(starts) else None
        where = f"{path}:{line}" if line is not None else str(path)
        annotations: dict[str, str] = policy_json.get("annotations", {})
        policy_id = annotations.get("id", "")
        if not policy_id:
            raise PolicyError(f'{where}: policy without @id("...")', file=str(path), line=line)
        effect = policy_json["effect"]
        approver = annotations.get("approver")
        if approver is not None and (effect != "permit" or not approver):
            raise PolicyError(
                f"{where}: policy {policy_id}: @approver must name a role or human, on a permit",
                file=str(path),
                policy_id=policy_id,
                line=line,
            )
        yield policy_id, policy_json, _Policy(policy_id, effect, approver or HUMAN)


def _locate_parse_error(text: str) -> tuple[int | None, str | None]:
    """Find the first statement that fails to parse alone: its line and ``@id`` (cedarpy gives neither)."""
    for line, statement in _statements(text):
        try:
            cedarpy.policies_to_json_str(statement)
        except ValueError:
            match = _ID_ANNOTATION.search(statement)
            return line, match.group(1) if match else None
    return None, None


def _statements(text: str) -> Iterator[tuple[int, str]]:
    """Split Cedar text at top-level ``;`` (outside strings and ``//`` comments).

    Yields:
        The 1-based line of each statement's first token, and the statement with its ``;``.
    """
    line = 1
    start = 0
    first: int | None = None
    in_string = in_comment = escaped = False
    for index, char in enumerate(text):
        if char == "\n":
            line += 1
            in_comment = False
        elif in_comment:
            continue
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == "/" and text.startswith("//", index):
            in_comment = True
        elif not char.isspace():
            if first is None:
                first = line
            if char == '"':
                in_string = True
            elif char == ";":
                yield first, text[start : index + 1]
                start, first = index + 1, None
    if first is not None:  # trailing text without ';' is a statement too (and a parse error)
        yield first, text[start:]


def _unique(ids: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def _ids(ids: Sequence[str]) -> str:
    return ", ".join(ids) if ids else "no policy"

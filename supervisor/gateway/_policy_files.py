"""Reading a directory of Cedar policy files: every policy with its ``@id``, its annotations
and the file and line it starts on, so that every error about a policy names all three.

Cedar numbers policies by position (``policy0``, ...) and reports no source lines;
:func:`read_policies` keeps, for each policy, where it is, and :class:`PolicyError` says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cedarpy

from corral.bus.errors import CorralError

HUMAN = "human"
"""The approver that outranks every role."""

_ID_ANNOTATION = re.compile(r'@id\s*\(\s*"((?:[^"\\]|\\.)*)"')


class PolicyError(CorralError):
    """A policy file is invalid, or a request cannot be evaluated at all.

    Args:
        message: The full, human-readable message (names the file and line when known).
        file: The policy file (or directory), if the error is about one.
        policy_id: The ``@id`` of the offending policy, if known.
        line: 1-based line of the offending text (or where its policy starts), if known.
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


@dataclass(frozen=True)
class Policy:
    """One policy as loaded."""

    id: str
    effect: Literal["permit", "forbid"]
    approver: str
    """For permits: who must approve when this permit allows an approval-pass action."""
    reason: str
    """For forbids: its ``@reason("...")``, said to the client when it refuses a call ("" if none)."""
    json: Any
    """Cedar's JSON form of the policy."""
    file: Path
    line: int | None
    """1-based line of its first token."""
    text: str
    """Its source, from its first token to its ``;``."""

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)


@dataclass(frozen=True)
class PolicyFile:
    """One ``*.cedar`` file: its text and its policies, in file order (Cedar's ``policy<n>``
    is the n-th)."""

    path: Path
    text: str
    policies: tuple[Policy, ...]


def read_policies(directory: Path) -> list[PolicyFile]:
    """Every ``*.cedar`` file of ``directory``, in name order.

    Raises:
        PolicyError: A file cannot be read or parsed, a policy lacks ``@id`` or repeats one,
            an ``@approver`` is empty or on a forbid, a ``@reason`` on a permit, a file holds a
            template, or the directory holds no policy file at all.
    """
    paths = sorted(directory.glob("*.cedar"))
    if not paths:
        raise PolicyError(f"{directory}: no *.cedar policy files", file=str(directory))
    files: list[PolicyFile] = []
    origin: dict[str, Policy] = {}
    for path in paths:
        text, policies = _load_file(path)
        for policy in policies:
            if policy.id in origin:
                raise PolicyError(
                    f"{policy.where()}: duplicate policy id {policy.id!r}"
                    f" (first defined in {origin[policy.id].where()})",
                    file=str(path),
                    policy_id=policy.id,
                    line=policy.line,
                )
            origin[policy.id] = policy
        files.append(PolicyFile(path, text, policies))
    return files


def _load_file(path: Path) -> tuple[str, tuple[Policy, ...]]:
    """Parse one file: its text and its policies, in file order."""
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
    statements = list(_statements(text))
    return text, tuple(_policies(path, parsed["staticPolicies"].values(), statements))


def _policies(path: Path, parsed: Iterable[Any], statements: Sequence[tuple[int, str]]) -> Iterator[Policy]:
    for position, policy_json in enumerate(parsed):
        # Cedar numbers policies in file order, the order the JSON object keeps.
        line, source = statements[position] if position < len(statements) else (None, "")
        where = f"{path}:{line}" if line is not None else str(path)
        annotations: dict[str, str] = policy_json.get("annotations", {})
        policy_id = annotations.get("id", "")
        if not policy_id:
            raise PolicyError(f'{where}: policy without @id("...")', file=str(path), line=line)
        effect = policy_json["effect"]
        approver = annotations.get("approver")
        reason = annotations.get("reason")
        misplaced = None
        if approver is not None and (effect != "permit" or not approver):
            misplaced = "@approver must name a role or human, on a permit"
        elif reason is not None and (effect != "forbid" or not reason):
            misplaced = "@reason must say why the call is refused, on a forbid"
        if misplaced:
            raise PolicyError(
                f"{where}: policy {policy_id}: {misplaced}", file=str(path), policy_id=policy_id, line=line
            )
        yield Policy(policy_id, effect, approver or HUMAN, reason or "", policy_json, path, line, source)


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
        The 1-based line of each statement's first token, and the statement from that token
        to its ``;``.
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
                first, start = line, index
            if char == '"':
                in_string = True
            elif char == ";":
                yield first, text[start : index + 1]
                first = None
    if first is not None:  # trailing text without ';' is a statement too (and a parse error)
        yield first, text[start:]


def line_of(policy: Policy, names: Sequence[str]) -> int | None:
    """The line of the first of ``names`` (whole words) in ``policy``'s text, else the
    policy's first line: where an error about those names points."""
    if policy.line is None:
        return None
    for name in names:
        match = re.search(rf"(?<![\w\"]){re.escape(name)}(?!\w)", policy.text)
        if match is not None:
            return policy.line + policy.text.count("\n", 0, match.start())
    return policy.line

"""One NATS identity per agent, one for the supervisor, one for clients, one for operators,
with permissions compiled from the handoff graph.

Identities are NATS nkeys (Ed25519): the server's configuration holds only public keys,
and a process proves its identity by signing the server's nonce with its seed, which
never leaves the process. A leaked server config therefore grants nothing, unlike a
user/password list. Each seed is written once, with mode 0600, and reused across runs.

Permissions are allow-lists, so anything not listed is denied by the broker:

* agent ``A``: publish only ``corral.from.A.{reply,error,event,dead,tool,model,journal,waiting}``
  and ``corral.from.A.handoff.T`` for each ``T`` the graph allows from ``A``; fetch and ack
  only its own inbox consumer; subscribe only to ``_INBOX.agent-A.>``. Agents have no
  access to the kill-switch bucket or any other JetStream API: they cannot create, delete
  or aim consumers, so they cannot blind the watchers of the processes that enforce kills
  (the supervisor and the gateway), which alone need to know them.
* supervisor: publish to every ``corral.agent.*.inbox`` (no one else may) and to
  ``corral.out.>``; JetStream API and the kill switches (an API operator's kill); answer
  the agents' step outputs, journal and tool requests.
* router (the model gateway): answer the agents' model requests; dead-letter poison ones.
* client ``C``: publish only ``corral.in.C.>``; subscribe only ``corral.out.C.>``.
* admin (the launcher and operator commands): JetStream API and the kill switches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corral.bus import subjects
from corral.supervisor.config._config import LoadedConfig

agent_identity = subjects.agent_identity

Role = Literal["agent", "supervisor", "gateway", "router", "client", "admin", "api"]

SUPERVISOR = "supervisor"
GATEWAY = "gateway"
ROUTER = "router"
ADMIN = "admin"
API = "api"


@dataclass(frozen=True, kw_only=True)
class Identity:
    """One NATS identity and what it may do."""

    name: str
    """File stem and inbox token: ``agent-<name>``, ``supervisor``, ``client``, ``admin``."""
    role: Role
    agent: str | None
    publish: list[str]
    subscribe: list[str]
    seed_file: Path
    public_key: str


def permissions(loaded: LoadedConfig, role: Role, name: str) -> tuple[list[str], list[str]]:
    """(publish allow-list, subscribe allow-list) of one identity: its role's, and its own
    spans subject (so its spans are stored under its name and no other's)."""
    publish, subscribe = _role_permissions(loaded, role, name)
    return [*publish, subjects.spans(name)], subscribe


def _role_permissions(loaded: LoadedConfig, role: Role, name: str) -> tuple[list[str], list[str]]:
    inbox = f"{subjects.inbox_prefix(name)}.>"
    if role == "agent":
        agent = name.removeprefix("agent-")
        consumer = subjects.agent_consumer(agent)
        publish = [
            subjects.agent_reply(agent),
            subjects.agent_error(agent),
            subjects.agent_event(agent),
            subjects.agent_dead_letter(agent),
            subjects.agent_tool(agent),
            subjects.agent_model(agent),
            subjects.agent_journal(agent),
            subjects.agent_waiting(agent),
            *(subjects.agent_handoff(agent, target) for target in loaded.targets(agent)),
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.WORK_STREAM}.{consumer}",
            f"$JS.ACK.{subjects.WORK_STREAM}.{consumer}.>",
        ]
        return publish, [inbox]
    if role == "supervisor":
        # It answers step outputs, journal and tool requests on the agents' own reply
        # inboxes (allow_responses), and checks that they are the senders' own.
        return [
            subjects.all_agent_inboxes(),
            subjects.all_conversation_updates(),
            "corral.dlq.>",
            "corral.audit.anchor",
            "$JS.API.>",
            f"$JS.ACK.{subjects.WORK_STREAM}.{subjects.SUPERVISOR_CONSUMER}.>",
            "$JS.FC.>",
            subjects.alerts(),
            # Kill switches; the desk's answers by name (a kill's reload forgets responses).
            f"$KV.{subjects.CONTROL_BUCKET}.>",
            f"{subjects.inbox_prefix(ADMIN)}.>",
            f"{subjects.inbox_prefix(API)}.>",
        ], [
            inbox,
            *subjects.agent_outputs(),
            subjects.operator_requests(),
            subjects.api_requests(),
            subjects.all_agent_tools(),
            subjects.all_agent_journals(),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>",
        ]
    if role == "gateway":
        # Answers tool requests (allow_responses), tells clients about decisions, and
        # dead-letters poison requests.
        return [subjects.all_conversation_updates(), subjects.dead_letter(">")], [
            inbox,
            subjects.all_agent_tools(),
        ]
    if role == "router":
        # Answers model requests (allow_responses), dead-letters poison ones, and raises
        # retry-storm alerts.
        return [subjects.dead_letter(">"), subjects.alerts()], [inbox, subjects.all_agent_models()]
    if role == "client":
        return [subjects.client_starts(name)], [subjects.client_updates(name), inbox]
    if role == "api":
        # Starts and messages for each API key's client (the API checks the key); its
        # questions to the supervisor and operator requests; and a conversation's events:
        # an ordered consumer on CORRAL_EVENTS (created, heartbeats, flow control), live
        # progress. Nothing else of JetStream's API.
        events = subjects.EVENTS_STREAM
        return [
            subjects.all_conversation_starts(),
            subjects.api_requests(),
            subjects.operator_requests(),
            f"$JS.API.CONSUMER.CREATE.{events}",
            f"$JS.API.CONSUMER.CREATE.{events}.>",
            f"$JS.API.CONSUMER.DELETE.{events}.>",
            f"$JS.API.CONSUMER.INFO.{events}.>",
            "$JS.FC.>",
        ], [inbox, subjects.all_conversation_updates(), subjects.alerts()]
    return [
        "$JS.API.>",
        f"$KV.{subjects.CONTROL_BUCKET}.>",
        "$JS.FC.>",
        subjects.approval_decisions(),
        subjects.operator_requests(),
    ], [inbox]


def _seed(path: Path) -> str:
    """The public key of the seed in ``path``, creating the seed (0600) if missing."""
    import nkeys

    if not path.exists():
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(seed)
    os.chmod(path, 0o600)
    key: bytes = nkeys.from_seed(bytearray(path.read_bytes().strip())).public_key
    return key.decode()


def identities(loaded: LoadedConfig, creds_dir: Path) -> list[Identity]:
    """Every identity of the team, generating seeds that do not exist yet."""
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(creds_dir, 0o700)
    wanted: list[tuple[str, Role, str | None]] = [(agent_identity(a), "agent", a) for a in loaded.agent_names]
    wanted += [
        (SUPERVISOR, "supervisor", None),
        (GATEWAY, "gateway", None),
        (ROUTER, "router", None),
        (subjects.DEFAULT_CLIENT, "client", None),
        (ADMIN, "admin", None),
        (API, "api", None),
    ]
    out = []
    for name, role, agent in wanted:
        seed_file = creds_dir / f"{name}.nk"
        publish, subscribe = permissions(loaded, role, name)
        out.append(
            Identity(
                name=name,
                role=role,
                agent=agent,
                publish=publish,
                subscribe=subscribe,
                seed_file=seed_file,
                public_key=_seed(seed_file),
            )
        )
    return out


def authorization_block(ids: Iterable[Identity], revoked_agents: Iterable[str] = ()) -> str:
    """The nats-server ``authorization`` block; revoked agents are left out entirely,
    so a config reload closes their connections and refuses their reconnects."""
    revoked = set(revoked_agents)
    users = []
    for identity in ids:
        if identity.agent is not None and identity.agent in revoked:
            continue
        perms: dict[str, Any] = {
            "publish": {"allow": identity.publish},
            "subscribe": {"allow": identity.subscribe},
        }
        if identity.role in ("supervisor", "gateway", "router"):
            perms["allow_responses"] = True
        users.append(
            f"    # {identity.name}\n    {{nkey: {identity.public_key}, permissions: {json.dumps(perms)}}}"
        )
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"

"""The tool interface: what a tool declares and what the gateway hands it.

Tools run only inside the tool gateway, which holds the backend's credentials; agents
see a tool's name, description and the JSON Schema of its arguments, nothing more.
A tool is one class with one required coroutine, ``run``; ``resource`` tells the
gateway what the call touches and the facts policy needs about it.

What Cedar sees of a tool is declared on its class, so that the policies can be checked
against a schema before any call (``supervisor.gateway._schema``): ``resource_type`` (an
``EntityType``: the attributes of what the tool touches and the types of its parents),
``fact_types`` (the context facts its ``Resource`` carries) and ``groups`` (the action groups
it belongs to, so that one policy covers them all: ``action in Action::"customer_owned"``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

import asyncpg
from pydantic import BaseModel

A = TypeVar("A", bound=BaseModel)


@dataclass(frozen=True, kw_only=True)
class ToolInput(Generic[A]):
    """Everything a tool call may use. The acting customer comes from the conversation,
    never from the model's arguments.

    Attributes:
        arguments: The validated arguments.
        customer: On whose behalf the call is made.
        conversation: The conversation it belongs to.
        agent: The agent that asked (from its credentials).
        idempotency_key: ``<conversation>:<step>:<call index>``; stable across retries.
        conn: A connection inside the gateway's transaction: the effect, the ledger
            entry and the audit record commit together or not at all. In the gateway it
            is a proxy (``fetch``, ``fetchrow``, ``fetchval``, ``execute``,
            ``executemany``) whose statements run as the role ``corral_tools``, which
            reaches only the schemas the tools module grants it (``SCHEMAS``).
    """

    arguments: A
    customer: str
    conversation: str
    agent: str
    idempotency_key: str
    conn: asyncpg.Connection


@dataclass(frozen=True)
class EntityType:
    """A kind of object tools touch, as Cedar sees it: e.g. an ``Order`` with an ``owner``
    and a total, whose parent is its customer (so that ``resource in context.customer``).

    Attributes:
        name: The Cedar type, e.g. ``"Order"`` (not ``Agent`` or ``Action``: those are corral's).
        attributes: Each attribute's type: ``int`` (Cedar ``Long``), ``bool``, ``str``, or an
            ``EntityType`` (a reference to such an entity). A ``Resource`` of this type
            carries them (one without, e.g. naming a row that does not exist, denies a call
            that a policy reading them decides: the engine fails closed).
        parents: The types its parents may have (Cedar's ``memberOfTypes``).
    """

    name: str
    attributes: Mapping[str, AttributeType] = field(default_factory=dict)
    parents: tuple[EntityType, ...] = ()


AttributeType: TypeAlias = type[int] | type[bool] | type[str] | EntityType
"""The type of an entity's attribute or of a context fact."""

CUSTOMER = EntityType("Customer")
"""The acting customer's type: every call's ``context.customer`` is one."""


def type_name(declared: EntityType | str) -> str:
    """The Cedar type's name of a ``resource_type``."""
    return declared if isinstance(declared, str) else declared.name


@dataclass(frozen=True)
class EntityRef:
    """A reference to an entity, as an attribute's value or a parent: ``EntityRef("Customer",
    "cus_1001")`` is Cedar's ``Customer::"cus_1001"``."""

    type: str
    id: str


@dataclass(frozen=True, kw_only=True)
class Resource:
    """What a call touches, and the facts the policy decides on."""

    type: str
    id: str
    facts: dict[str, Any] = field(default_factory=dict)
    """The context facts the tool declares in ``fact_types``: integers, booleans and strings
    (Cedar has no decimals: money is in cents)."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """The entity's attributes, as its ``EntityType`` declares them (an ``EntityRef`` for an
    entity-typed one): ``resource.owner`` in a policy."""
    parents: tuple[EntityRef, ...] = ()
    """The entities it belongs to: ``resource in Customer::"cus_1001"`` holds for an order
    whose parents hold ``EntityRef("Customer", "cus_1001")``."""
    unknown: str | None = None
    """What the call names that the backend does not know, e.g. ``"customer cus_9"``: the
    gateway then refuses the call (``customer cus_9 is not known``) without asking Cedar."""


class Tool(ABC, Generic[A]):
    """A capability the gateway can apply on an agent's behalf."""

    name: ClassVar[str]
    description: ClassVar[str]
    arguments: ClassVar[type[BaseModel]]
    changes_state: ClassVar[bool] = True
    """False for lookups; True for anything with an effect."""
    undo: ClassVar[str | None] = None
    """Name of the tool that compensates this one (``refund`` -> ``reverse_refund``)."""
    isolation: ClassVar[Literal["loop", "thread", "process"]] = "thread"
    """Where the gateway runs ``resource()`` and ``run()``, and what the call's deadline
    bounds there:

    - ``"loop"``: on the gateway's own event loop, at no cost; bounded only in what the body
      awaits (its statements), not in what it computes. For bodies that only await SQL.
    - ``"thread"``: in a worker thread with an event loop of its own (every statement hops
      to the gateway's loop: about half a millisecond per call); bounds pure-Python loops
      and awaits, but not one C-level operation (``9**9**9``), which holds the interpreter
      lock and stalls every thread, the gateway's loop with them.
    - ``"process"``: in a child Python process (``supervisor.gateway._tool_process``), killed at the
      deadline; bounds everything, at the cost of a pipe round trip per statement and per
      body. The tool instance is pickled into the child: its class, and its arguments
      model, must be defined at module level."""
    resource_type: ClassVar[EntityType | str] = CUSTOMER
    """The type of what ``resource()`` names (a name alone: an ``EntityType`` of no attributes,
    unless another tool declares it); the gateway denies a call whose resource has another."""
    fact_types: ClassVar[Mapping[str, AttributeType]] = {}
    """The type of each context fact ``resource()`` supplies (``{"amount_cents": int}``).
    The gateway adds ``irreversible`` (bool) and ``customer`` (the acting ``Customer``) to
    every call's context: no tool declares those."""
    groups: ClassVar[tuple[str, ...]] = ()
    """The action groups the tool belongs to (``("customer_owned",)``): a policy on
    ``Action::"customer_owned"`` covers it, and its approval pass with it. Every irreversible
    tool is in ``Action::"irreversible"`` as well."""
    needs_customer: ClassVar[bool] = False
    """It acts on the acting customer's data: in a conversation without a customer the
    gateway refuses it (``the conversation has no customer``) without asking Cedar."""
    resource_fields: ClassVar[tuple[str, ...]] = ()
    """The arguments that name what a call touches (``("order_id",)``). The gateway's loop
    breaker counts a conversation's calls by tool and these, so free text such as a reason
    cannot make the same call look new; none: every call of the tool counts as one
    resource (the acting customer)."""

    @property
    def irreversible(self) -> bool:
        """Changes state and has no undo: the sample policies require approval."""
        return self.changes_state and self.undo is None

    def undo_arguments(self, arguments: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Arguments of the ``undo`` tool that compensates a call with this result."""
        return {}

    def resource_key(self, arguments: dict[str, Any]) -> str:
        """The resource a call with these (validated, JSON) arguments touches, as the loop
        breaker counts it."""
        return json.dumps([arguments.get(name) for name in self.resource_fields], sort_keys=True)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the arguments, as the model sees it."""
        return self.arguments.model_json_schema()

    async def resource(self, call: ToolInput[A]) -> Resource:
        """What the call touches; by default the acting customer."""
        return Resource(type="Customer", id=call.customer)

    @abstractmethod
    async def run(self, call: ToolInput[A]) -> dict[str, Any]:
        """Apply the call and return a JSON-able result."""

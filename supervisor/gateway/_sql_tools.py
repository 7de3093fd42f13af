"""Tools that declare their SQL: the facts policy decides on and the effect, as statements.

A ``SqlTool`` is a ``Tool`` whose ``resource()`` and ``run()`` are each one declared
statement. ``store.install_statements`` (run as the database owner, where the tools
module's ``setup`` runs) makes each statement a function in the schema ``corral_sql``:
SECURITY DEFINER, owned by ``corral_tool_statements``, a member of ``corral_tools``. Whichever of the
gateway's statements calls it, it runs with the tools' privileges and no more, so the
gateway sends the facts inside the call's first statement and the effect inside the one
that writes the ledger entry and the audit record: an allowed call takes 4 round trips
(begin, the first statement, the effect with its records, commit) instead of 7.

A statement's parameters are named (``parameters``): fields of the arguments model, typed
from it (``str`` text, ``int`` bigint, ``float`` double precision, ``bool`` boolean), or
the call's ``customer``, ``conversation``, ``agent`` and ``idempotency_key`` (text). Names
in the statements must be schema-qualified (the functions' search_path is
``pg_catalog, pg_temp``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from corral.supervisor.gateway._tools import A, EntityRef, EntityType, Resource, Tool, ToolInput, type_name
from corral.supervisor.store._tool_statements import SQL_SCHEMA, DeclaredStatement

CONTEXT = ("customer", "conversation", "agent", "idempotency_key")
"""Parameters a statement may name besides the arguments' fields (all text)."""
_TYPES = {str: "text", int: "bigint", float: "double precision", bool: "boolean"}
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,40}")

Kind = Literal["facts", "effect"]
T = TypeVar("T")


class SqlTool(Tool[A]):
    """A tool whose facts and effect are SQL statements (see the module's docstring).

    ``facts_sql`` returns one row with a jsonb column ``facts``: what Cedar decides on, about
    the resource ``resource_type`` / the first of ``resource_fields``, else the customer. Its
    keys are the context facts (``fact_types``), the resource's attributes (those its
    ``EntityType`` declares; an entity-typed one as the entity's id; NULL: left out), and two
    more: ``parents``, an array of the resource's parents (ids of its one parent type, or
    ``{"type": ..., "id": ...}`` objects; NULLs left out), and ``unknown`` (``Resource.unknown``:
    what the backend does not know, e.g. ``'customer ' || $1``; NULL: nothing);
    ``effect_sql`` returns one row with a jsonb column ``result``: the call's result, or
    ``{"error": ...}`` for an effect the backend refuses. A refused effect commits like any
    other call, recorded as ``error``: such a statement must write nothing.
    """

    isolation = "loop"  # its bodies only await SQL
    facts_sql: ClassVar[str | None] = None
    facts_parameters: ClassVar[tuple[str, ...]] = ()
    """The names of ``facts_sql``'s ``$1``, ``$2``, ..."""
    effect_sql: ClassVar[str]
    effect_parameters: ClassVar[tuple[str, ...]] = ()
    """The names of ``effect_sql``'s ``$1``, ``$2``, ..."""

    def _parameters(self, kind: Kind) -> tuple[str, ...]:
        return self.facts_parameters if kind == "facts" else self.effect_parameters

    def values(self, kind: Kind, call: ToolInput[A]) -> list[object]:
        """A statement's parameters for ``call``, in the order it names them."""
        return [
            getattr(call, name) if name in CONTEXT else getattr(call.arguments, name)
            for name in self._parameters(kind)
        ]

    def types(self, kind: Kind) -> list[str]:
        """The PostgreSQL type of each of a statement's parameters (worked out once)."""
        return self._once("types", kind, self._types_of)

    def _once(self, what: str, kind: Kind, compute: Callable[[Kind], T]) -> T:
        """``compute(kind)``, worked out once per tool (the class declares fixed statements)."""
        cache: dict[tuple[str, Kind], Any] = self.__dict__.setdefault("_worked_out", {})
        if (what, kind) not in cache:
            cache[(what, kind)] = compute(kind)
        return cache[(what, kind)]  # type: ignore[no-any-return]

    def _types_of(self, kind: Kind) -> list[str]:
        fields = self.arguments.model_fields
        types = []
        for name in self._parameters(kind):
            if name in CONTEXT:
                types.append("text")
                continue
            field = fields.get(name)
            sql_type = _TYPES.get(field.annotation) if field is not None else None  # type: ignore[arg-type]
            if sql_type is None:
                raise ValueError(
                    f"tool {self.name}: parameter {name!r} is neither one of {CONTEXT} nor an argument"
                    " of type str, int, float or bool"
                )
            types.append(sql_type)
        return types

    def function(self, kind: Kind) -> str | None:
        """The installed function of a statement (its name carries a digest of its text and
        parameter types: a changed statement is a new function), or None (none declared).
        Worked out once per tool and kind: the gateway asks on every call."""
        return self._once("function", kind, self._function)

    def _function(self, kind: Kind) -> str | None:
        sql = self.facts_sql if kind == "facts" else self.effect_sql
        if sql is None or not _NAME.fullmatch(self.name):
            return None
        digest = hashlib.sha256(json.dumps([sql, self.types(kind)]).encode()).hexdigest()[:12]
        return f"{SQL_SCHEMA}.{self.name}_{kind}_{digest}"

    def call_sql(self, kind: Kind, placeholders: Sequence[str]) -> str:
        """The SQL expression calling a statement's function, its parameters at ``placeholders``
        (``$effect_0``, ``owner.customer``: see ``_statements``)."""
        function = self.function(kind)
        assert function is not None, f"tool {self.name} declares no {kind} statement"
        types = self.types(kind)
        casts = ", ".join(
            f"{placeholder}::{sql_type}" for placeholder, sql_type in zip(placeholders, types, strict=True)
        )
        return f"{function}({casts})"

    def runs_as_declared(self) -> bool:
        """Its bodies are its statements: a subclass that overrides ``resource()`` or
        ``run()`` has its bodies run as a ``Tool``'s are."""
        return type(self).resource is SqlTool.resource and type(self).run is SqlTool.run

    def declared_statements(self) -> list[DeclaredStatement]:
        """What ``install_statements`` installs for this tool."""
        declared = [("facts", self.facts_sql, "facts"), ("effect", self.effect_sql, "result")]
        return [
            DeclaredStatement(function, tuple(self.types(kind)), sql, column)  # type: ignore[arg-type]
            for kind, sql, column in declared
            if sql is not None and (function := self.function(kind)) is not None  # type: ignore[arg-type]
        ]

    def resource_id(self, call: ToolInput[A]) -> str:
        """The id of what a call touches: the first resource field, else the customer."""
        if self.resource_fields:
            return str(getattr(call.arguments, self.resource_fields[0]))
        return call.customer

    def resource_of(self, call: ToolInput[A], facts: dict[str, Any]) -> Resource:
        """The resource of a call whose facts statement answered ``facts`` (see the class)."""
        facts = dict(facts)
        unknown = facts.pop("unknown", None)
        listed = facts.pop("parents", None) or []
        declared = self.resource_type
        attributes: dict[str, Any] = {}
        parents: list[EntityRef] = []
        if isinstance(declared, EntityType):
            for name, attribute_type in declared.attributes.items():
                value = facts.pop(name, None)
                if isinstance(attribute_type, EntityType) and value is not None:
                    attributes[name] = EntityRef(attribute_type.name, str(value))
                elif value is not None:
                    attributes[name] = value
            only = declared.parents[0].name if len(declared.parents) == 1 else None
            for parent in listed:
                if isinstance(parent, dict):
                    parents.append(EntityRef(str(parent["type"]), str(parent["id"])))
                elif parent is not None and only is not None:
                    parents.append(EntityRef(only, str(parent)))
        return Resource(
            type=type_name(declared),
            id=self.resource_id(call),
            facts=facts,
            attributes=attributes,
            parents=tuple(parents),
            unknown=str(unknown) if unknown is not None else None,
        )

    async def resource(self, call: ToolInput[A]) -> Resource:
        """The facts statement, run as the tools' role on the call's connection."""
        if self.facts_sql is None:
            return self.resource_of(call, {})
        row = await call.conn.fetchrow(self.facts_sql, *self.values("facts", call))
        return self.resource_of(call, json_object(row["facts"] if row else None, self.name, "facts"))

    async def run(self, call: ToolInput[A]) -> dict[str, Any]:
        """The effect statement, run as the tools' role on the call's connection."""
        row = await call.conn.fetchrow(self.effect_sql, *self.values("effect", call))
        return json_object(row["result"] if row else None, self.name, "result")


def json_object(value: Any, tool: str, column: str) -> dict[str, Any]:
    """A statement's jsonb answer as a dict.

    Raises:
        ValueError: it is not a JSON object (no row, NULL, an array...).
    """
    loaded = json.loads(value) if isinstance(value, str) else value
    if not isinstance(loaded, dict):
        raise ValueError(f"tool {tool}: its statement returned no {column} object ({value!r})")
    return loaded

"""The OpenAPI 3.1 document, generated from the endpoints and the pydantic models that
validate their bodies (``_models``): what is served at ``/openapi.json`` is what is
checked."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from corral.supervisor.api._models import Problem

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: its route, and what the document says of it."""

    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    operator: bool = False
    stream: bool = False
    also: tuple[int, ...] = ()
    """Further success statuses, answered with the same body (202 for a start not yet
    recorded)."""


def openapi(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The document of ``endpoints``."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": _REF.format(model=model.__name__)}

    problem = {"application/problem+json": {"schema": ref(Problem)}}
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        responses: dict[str, Any] = {}
        if e.stream:
            responses[str(e.status)] = {
                "description": "Server-Sent Events; a stored event's id resumes the stream (Last-Event-ID)",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        elif e.response is not None:
            responses[str(e.status)] = {
                "description": e.summary,
                "content": {"application/json": {"schema": ref(e.response)}},
            }
        for status, why in _errors(e):
            responses[str(status)] = {"description": why, "content": problem}
        operation: dict[str, Any] = {
            "summary": e.summary,
            "operationId": _operation_id(e),
            "security": [{"apiKey": []}],
            "responses": responses,
        }
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
            }
            for name in re.findall(r"{(\w+)}", e.path)
        ]
        if e.stream:
            parameters.append(
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}}
            )
        if parameters:
            operation["parameters"] = parameters
        if e.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(e.body)}},
            }
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "corral", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


def _errors(e: Endpoint) -> list[tuple[int, str]]:
    errors = [(401, "no valid API key" + (" of an operator" if e.operator else ""))]
    if "{" in e.path:
        errors.append((404, "no such conversation (or not this key's)"))
    if e.body is not None:
        errors += [(413, "the body is too large"), (422, "the body is not valid")]
    if e.method == "POST" and not e.operator:
        errors += [(403, "a customer this key may not act for"), (429, "too many requests; see Retry-After")]
    if e.operator and e.method == "POST":
        errors.append((409, "the action cannot be taken now (the reason says why)"))
    errors.append((503, "the supervisor is not answering; try again"))
    return errors


def _operation_id(e: Endpoint) -> str:
    words = [w for w in re.split(r"[/{}]+", e.path) if w and w != "v1"]
    return e.method.lower() + "_" + "_".join(words)

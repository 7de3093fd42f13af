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
_SSE_EVENT = {
    "type": "object",
    "description": "One event: its type, its data (JSON), and for a stored one its id",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


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
    produces: str | None = None
    """The path parameter its response body names (``conversation`` for a start): the
    document links it to every operation on that parameter, for stateful clients and
    fuzzers (OpenAPI links)."""
    conflicts: bool = False
    """It may answer 409 (an action that cannot be taken now)."""


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
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            }
        elif e.response is None:
            # A body the page reads as it is (the console's trace, graph): an object.
            responses[str(e.status)] = {
                "description": e.summary,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        else:
            for status in (e.status, *e.also):
                responses[str(status)] = {
                    "description": e.summary,
                    "content": {"application/json": {"schema": ref(e.response)}},
                }
                if e.produces is not None:
                    responses[str(status)]["links"] = _links(e.produces, endpoints)
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


def _links(parameter: str, endpoints: list[Endpoint]) -> dict[str, Any]:
    """Links from a response body's ``parameter`` to the operations on it (not the streams:
    a stream lasts as long as its conversation)."""
    return {
        _operation_id(e): {
            "operationId": _operation_id(e),
            "parameters": {parameter: f"$response.body#/{parameter}"},
        }
        for e in endpoints
        if f"{{{parameter}}}" in e.path and not e.stream
    }


def _errors(e: Endpoint) -> list[tuple[int, str]]:
    errors = [(401, "no valid API key" + (" of an operator" if e.operator else ""))]
    if "{" in e.path:
        errors.append((404, "no such conversation (or not this key's)"))
    if e.body is not None:
        errors += [(413, "the body is too large"), (422, "the body is not valid")]
    if e.method == "POST" and not e.operator:
        errors += [(403, "a customer this key may not act for"), (429, "too many requests; see Retry-After")]
    if (e.operator and e.method == "POST") or e.conflicts:
        errors.append((409, "the action cannot be taken now (the reason says why)"))
    errors.append((503, "the supervisor is not answering; try again"))
    return errors


def _operation_id(e: Endpoint) -> str:
    words = [w for w in re.split(r"[/{}]+", e.path) if w and w != "v1"]
    return e.method.lower() + "_" + "_".join(words)

"""The starter team's tools: user code, named by ``tools: {path: tools.py}`` in the
``corral.yaml`` beside it. Tools run only inside corral's tool gateway, which checks every
call against the Cedar policies in ``policies/`` and records it in the audit log.

A tool is a class with ``name``, ``description``, a pydantic model of its ``arguments``
(the model sees its JSON Schema) and one coroutine, ``run``. Its ``call.conn`` is a
database connection inside the gateway's transaction (for tools over SQL; add
``SCHEMAS = ["yours"]`` and an ``async def setup(conn)`` that creates them); this one
reads a dictionary instead, so the team runs without a schema of its own.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral import Tool, ToolInput

ORDERS = {"1001": "shipped", "1002": "being packed", "1003": "delivered"}
"""The backend of this example: order id -> status."""


class OrderArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_id: str = Field(description="The order's number, e.g. '1001'", max_length=64)


class OrderStatus(Tool[OrderArgs]):
    name = "order_status"
    description = "Where one order is: its shipping status."
    arguments = OrderArgs
    changes_state = False
    isolation = "loop"  # it only reads a dictionary: run it on the gateway's own loop
    resource_fields = ("order_id",)

    async def run(self, call: ToolInput[OrderArgs]) -> dict[str, Any]:
        status = ORDERS.get(call.arguments.order_id)
        if status is None:
            return {"error": f"no order {call.arguments.order_id}"}
        return {"order_id": call.arguments.order_id, "status": status}


TOOLS = [OrderStatus()]

"""A refusal says what is wrong (issue 15, item 5): a conversation without a customer, a
customer the shop does not know and a policy's denial are three answers, not one
``forbidden by P-50``. Against a real PostgreSQL and the sample shop, as tests/test_gateway.py."""

from __future__ import annotations

from typing import Any

import pytest

from corral.bus import ToolCall
from corral.supervisor.gateway._gateway import GatewayConfig
from tests.sample_tools import TOOLS, Refund
from tests.test_gateway import (
    Shop,
    assert_audit_intact,
    audit_rows,
    open_conversation,
    policy,
    refund,
    shop,
    shop_snapshot,
)

__all__ = ["policy", "shop"]  # fixtures


class _PythonRefund(Refund):
    """The refund with its bodies run as a ``Tool``'s (its facts statement from Python), not
    inside the gateway's statements: both paths explain a refusal alike."""

    async def run(self, call: Any) -> dict[str, Any]:
        return await super().run(call)


def _gateway(shop: Shop, path: str) -> Any:
    if path == "declared":
        return shop.gateway
    return shop.new_gateway([_PythonRefund(), *(t for t in TOOLS if t.name != "refund")], GatewayConfig())


def _cancel(conversation: str, subscription: str) -> ToolCall:
    return ToolCall(
        conversation=conversation,
        step=1,
        index=0,
        agent="payments",
        tool="cancel_subscription",
        arguments={"subscription_id": subscription},
    )


PATHS = pytest.mark.parametrize("path", ["declared", "python"])


@PATHS
async def test_a_conversation_without_a_customer_says_so(shop: Shop, path: str) -> None:
    await open_conversation(shop.pool, "c-nobody", "", "payments")
    before = await shop_snapshot(shop.pool)

    result = await _gateway(shop, path).call(refund("c-nobody", "1001", 4_000), "payments")

    assert (result.status, result.reason, result.policy_ids) == (
        "denied",
        "the conversation has no customer",
        [],
    )
    assert await shop_snapshot(shop.pool) == before
    [row] = await audit_rows(shop.pool, "c-nobody")
    assert (row["decision"], row["outcome"], row["detail"]) == (
        "deny",
        "denied",
        "the conversation has no customer",
    )
    await assert_audit_intact(shop.pool)


@PATHS
async def test_an_unknown_customer_says_so(shop: Shop, path: str) -> None:
    await open_conversation(shop.pool, "c-stranger", "cus_x", "payments")

    result = await _gateway(shop, path).call(refund("c-stranger", "1001", 4_000), "payments")

    assert (result.status, result.reason, result.policy_ids) == ("denied", "customer cus_x is not known", [])
    [row] = await audit_rows(shop.pool, "c-stranger")
    assert (row["decision"], row["detail"]) == ("deny", "customer cus_x is not known")


@PATHS
async def test_a_policys_denial_names_the_policy_and_its_reason(shop: Shop, path: str) -> None:
    await open_conversation(shop.pool, "c-other", "cus_1001", "payments")

    result = await _gateway(shop, path).call(refund("c-other", "77", 4_000), "payments")  # cus_1004's

    assert (result.status, result.policy_ids) == ("denied", ["P-50"])
    assert result.reason == "payments may not refund: forbidden by P-50 (it is not the customer's)"


async def test_a_tool_of_python_bodies_explains_alike(shop: Shop) -> None:
    """cancel_subscription names its subscription in Python: owner, status, parent."""
    for conversation, customer in (
        ("c-c1", ""),
        ("c-c2", "cus_9"),
        ("c-c3", "cus_1002"),
        ("c-c4", "cus_1001"),
    ):
        await open_conversation(shop.pool, conversation, customer, "payments")
    nobody = await shop.gateway.call(_cancel("c-c1", "sub_1"), "payments")
    stranger = await shop.gateway.call(_cancel("c-c2", "sub_1"), "payments")
    other = await shop.gateway.call(_cancel("c-c3", "sub_1"), "payments")  # sub_1 is cus_1001's
    own = await shop.gateway.call(_cancel("c-c4", "sub_1"), "payments")

    assert (nobody.status, nobody.reason) == ("denied", "the conversation has no customer")
    assert (stranger.status, stranger.reason) == ("denied", "customer cus_9 is not known")
    assert (other.status, other.policy_ids) == ("denied", ["P-50", "P-60"])
    # Its own subscription: irreversible, so an account_manager approves (P-60, P-62).
    assert (own.status, own.policy_ids) == ("approval_required", ["P-60", "P-62"])


async def test_a_lookup_without_a_customer_is_refused_but_for_a_customer_allowed(shop: Shop) -> None:
    await open_conversation(shop.pool, "c-l1", "", "triage")
    await open_conversation(shop.pool, "c-l2", "cus_1001", "triage")
    lookup = {
        "tool": "lookup_order",
        "arguments": {"order_id": "77"},
        "step": 1,
        "index": 0,
        "agent": "triage",
    }
    refused = await shop.gateway.call(ToolCall(conversation="c-l1", **lookup), "triage")
    allowed = await shop.gateway.call(ToolCall(conversation="c-l2", **lookup), "triage")

    assert (refused.status, refused.reason) == ("denied", "the conversation has no customer")
    # P-10 lets every agent look orders up; the tool answers only with the customer's own.
    assert (allowed.status, allowed.policy_ids, allowed.result) == (
        "error",
        ["P-10"],
        {"error": "no such order"},
    )

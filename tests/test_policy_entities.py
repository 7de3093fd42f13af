"""What Cedar sees of a call beyond flat facts: the resource as an entity (attributes and
parents), action groups, and a forbid on a tool or a group holding in the approval pass too."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest

from corral import EntityRef, Resource
from corral.supervisor.gateway._policy import PolicyEngine, PolicyError, PolicyRequest
from corral.supervisor.gateway._tool_worker import from_child
from tests.sample_tools import TOOLS

POLICIES = Path(__file__).resolve().parent.parent / "examples" / "support" / "policies"


def _engine(tmp_path: Path, text: str) -> PolicyEngine:
    (tmp_path / "p.cedar").write_text(text, encoding="utf-8")
    return PolicyEngine.load(tmp_path, TOOLS, strict=False)


def _refund(owner: str | None = "cus_1001", *, agent: str = "payments", **facts: Any) -> PolicyRequest:
    owned = EntityRef("Customer", owner) if owner else None
    return PolicyRequest(
        principal=agent,
        action="refund",
        resource_type="Order",
        resource_id="1001",
        context={"amount_cents": 4000, "account_age_days": 400, "refunds_today_cents": 0, **facts},
        customer="cus_1001",
        attributes={"owner": owned, "total_cents": 4000} if owned else {},
        parents=(owned,) if owned else (),
    )


def _summary(engine: PolicyEngine, request: PolicyRequest) -> tuple[str, tuple[str, ...], str | None]:
    decision = engine.decide(request)
    return decision.outcome, decision.policy_ids, decision.approver


def test_a_policy_reads_the_resources_attributes(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        '@id("A-1")\npermit (principal, action == Action::"refund", resource)\n'
        "when { resource.owner == context.customer && context.amount_cents <= resource.total_cents };\n",
    )
    assert _summary(engine, _refund()) == ("allow", ("A-1",), None)
    assert _summary(engine, _refund(amount_cents=4001)) == ("deny", (), None)
    assert _summary(engine, _refund("cus_1004")) == ("deny", (), None)


def test_a_policy_reads_the_resources_parents(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        '@id("A-2")\npermit (principal, action == Action::"refund", resource in Customer::"cus_1001");\n'
        '@id("A-3")\npermit (principal, action == Action::"lookup_customer", resource)'
        " when { resource in context.customer };\n",
    )
    assert _summary(engine, _refund()) == ("allow", ("A-2",), None)
    assert _summary(engine, _refund("cus_1004")) == ("deny", (), None)
    # The customer itself is in itself (Cedar's `in` is reflexive): no entity needed.
    customer = PolicyRequest(
        principal="triage",
        action="lookup_customer",
        resource_type="Customer",
        resource_id="cus_1001",
        context={},
        customer="cus_1001",
    )
    assert _summary(engine, customer) == ("allow", ("A-3",), None)


def test_a_policy_reading_an_attribute_the_resource_lacks_fails_closed(tmp_path: Path) -> None:
    """An order that does not exist has no owner: the forbid errs, and the call is denied by it."""
    engine = _engine(
        tmp_path,
        '@id("A-4")\npermit (principal, action == Action::"refund", resource);\n'
        '@id("A-5")\nforbid (principal, action == Action::"refund", resource)'
        " unless { resource.owner == context.customer };\n",
    )
    decision = engine.decide(_refund(None))
    assert (decision.outcome, decision.policy_ids) == ("deny", ("A-5",))
    assert "could not be evaluated" in decision.reason


@pytest.fixture(scope="module")
def sample() -> PolicyEngine:
    return PolicyEngine.load(POLICIES, TOOLS)


def test_a_forbid_on_a_group_holds_in_the_approval_pass(sample: PolicyEngine) -> None:
    # $4,800: P-47 would let a human approve it; the order is another customer's, and P-50
    # (on the group customer_owned) forbids the approval pass too.
    assert _summary(sample, _refund(amount_cents=480_000)) == ("approval", ("P-47",), "human")
    assert _summary(sample, _refund("cus_1004", amount_cents=480_000)) == ("deny", ("P-50",), None)


def test_a_forbid_on_a_tool_holds_in_the_approval_pass_but_one_on_its_direct_call_does_not(
    tmp_path: Path,
) -> None:
    engine = _engine(
        tmp_path,
        '@id("B-1")\n@approver("human")\npermit (principal, action == Action::"refund:approve", resource);\n'
        '@id("B-2")\nforbid (principal, action == Action::"refund", resource)'
        " when { context.amount_cents > 100 };\n"
        '@id("B-3")\nforbid (principal, action in Action::"refund", resource)'
        " when { context.amount_cents > 900 };\n",
    )
    assert _summary(engine, _refund(amount_cents=500)) == ("approval", ("B-2", "B-1"), "human")
    assert _summary(engine, _refund(amount_cents=1000)) == ("deny", ("B-3", "B-2"), None)


def test_a_tool_in_a_group_is_covered_by_the_groups_rule(sample: PolicyEngine) -> None:
    for tool in ("send_email", "send_correction"):
        request = PolicyRequest(
            principal="payments", action=tool, resource_type="Customer", resource_id="c", context={}
        )
        decision = sample.decide(request)
        assert (decision.outcome, decision.policy_ids) == ("allow", ("P-13",))


def test_irreversible_is_the_engines_and_a_group(sample: PolicyEngine) -> None:
    """A tool cannot make itself reversible through its facts: the declaration decides."""
    request = PolicyRequest(
        principal="tech_support",
        action="update_email",
        resource_type="Customer",
        resource_id="cus_1001",
        context={"irreversible": False},
        customer="cus_1001",
    )
    assert _summary(sample, request) == ("approval", ("P-60", "P-61"), "account_manager")


def test_a_denial_says_the_forbids_reasons(sample: PolicyEngine) -> None:
    decision = sample.decide(_refund("cus_1004", agent="triage"))
    assert decision.policy_ids == ("P-49", "P-50")
    assert decision.reason == (
        "triage may not refund: forbidden by P-49, P-50 (this agent never refunds; it is not the customer's)"
    )


def test_a_resource_of_another_type_than_declared_is_denied(sample: PolicyEngine) -> None:
    request = PolicyRequest(
        principal="payments", action="refund", resource_type="Customer", resource_id="cus_1001", context={}
    )
    decision = sample.decide(request)
    assert (decision.outcome, decision.policy_ids) == ("deny", ())
    assert decision.reason == "refund denied: it names a Customer; its declared resource type is Order"


def test_a_tool_the_policies_were_not_bound_to_is_denied(sample: PolicyEngine) -> None:
    request = PolicyRequest(
        principal="payments", action="teleport", resource_type="Customer", resource_id="c", context={}
    )
    assert sample.decide(request).reason == "payments may not teleport: the policies know no tool teleport"


def test_an_unbound_engine_decides_nothing() -> None:
    with pytest.raises(PolicyError, match="not bound"):
        PolicyEngine.load(POLICIES).decide(_refund())


def test_an_attribute_cedar_cannot_hold_is_an_error(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        '@id("C-1")\npermit (principal, action == Action::"refund", resource)'
        " when { resource.total_cents > 0 };\n",
    )
    request = _refund()
    with pytest.raises(PolicyError, match="Cedar cannot represent"):
        engine.decide(
            dataclasses.replace(request, attributes={**request.attributes, "total_cents": object()})
        )


def test_only_the_attributes_a_policy_reads_reach_cedar(sample: PolicyEngine) -> None:
    """The sample's policies read no attribute: one Cedar cannot hold is never sent."""
    request = _refund()
    decision = sample.decide(dataclasses.replace(request, attributes={"total_cents": object()}))
    assert (decision.outcome, decision.policy_ids) == ("allow", ("P-45",))


def test_a_resource_with_parents_crosses_from_a_tools_process() -> None:
    """What a process tool's ``resource()`` returns is unpickled with an allow-list: an
    ``EntityRef`` is on it."""
    owner = EntityRef("Customer", "cus_1001")
    resource = Resource(type="Order", id="1001", attributes={"owner": owner}, parents=(owner,))
    assert from_child(pickle.dumps(resource)) == resource

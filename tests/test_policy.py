"""The Cedar policy engine, through the sample policies of examples/support/policies."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from corral.supervisor.gateway._policy import PolicyDecision, PolicyEngine, PolicyError, PolicyRequest
from corral.supervisor.gateway._tools import EntityRef, type_name
from tests.sample_tools import TOOLS

POLICIES = Path(__file__).resolve().parent.parent / "examples" / "support" / "policies"
AGENTS = ("triage", "payments", "tech_support", "account_manager")
CUSTOMER = "cus_1001"
"""The acting customer of every request below."""
RESOURCE_TYPES = {tool.name: type_name(tool.resource_type) for tool in TOOLS}


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load(POLICIES, TOOLS)


def _owned_by(owner: str) -> dict[str, Any]:
    """An order's or a subscription's owner: its attribute and its parent."""
    return {"attributes": {"owner": EntityRef("Customer", owner)}, "parents": (EntityRef("Customer", owner),)}


def _refund(agent: str = "payments", *, owner: str = CUSTOMER, **context: Any) -> PolicyRequest:
    facts: dict[str, Any] = dict(amount_cents=4000, account_age_days=400, refunds_today_cents=0)
    facts.update(context)
    owned = _owned_by(owner)
    return PolicyRequest(
        principal=agent,
        action="refund",
        resource_type="Order",
        resource_id="77",
        context=facts,
        customer=CUSTOMER,
        attributes={**owned["attributes"], "total_cents": 99_900},
        parents=owned["parents"],
    )


def _call(agent: str, tool: str, *, owner: str = CUSTOMER) -> PolicyRequest:
    """A call of ``tool`` on something ``owner`` owns (the customer itself, for a tool whose
    resource is the customer)."""
    resource_type = RESOURCE_TYPES.get(tool, "Customer")
    if resource_type == "Customer":
        return PolicyRequest(
            principal=agent,
            action=tool,
            resource_type="Customer",
            resource_id=owner,
            context={},
            customer=CUSTOMER,
        )
    return PolicyRequest(
        principal=agent,
        action=tool,
        resource_type=resource_type,
        resource_id="x-1",
        context={},
        customer=CUSTOMER,
        **_owned_by(owner),
    )


def _summary(decision: PolicyDecision) -> tuple[str, tuple[str, ...], str | None]:
    return decision.outcome, decision.policy_ids, decision.approver


CASES = [
    pytest.param(_refund(), ("allow", ("P-45",), None), id="$40-old-account"),
    pytest.param(
        _refund(account_age_days=30), ("approval", ("P-51",), "account_manager"), id="$40-young-account"
    ),
    pytest.param(
        _refund(amount_cents=40000), ("approval", ("P-51",), "account_manager"), id="$400-by-payments"
    ),
    pytest.param(_refund("account_manager", amount_cents=40000), ("allow", ("P-46",), None), id="$400-by-am"),
    pytest.param(_refund(amount_cents=480000), ("approval", ("P-47",), "human"), id="$4800-by-payments"),
    pytest.param(
        _refund("account_manager", amount_cents=480000), ("approval", ("P-47",), "human"), id="$4800-by-am"
    ),
    pytest.param(_refund("triage", amount_cents=480000), ("deny", ("P-49",), None), id="$4800-by-triage"),
    pytest.param(_refund("tech_support"), ("deny", ("P-49",), None), id="$40-by-tech-support"),
    pytest.param(_refund("stranger"), ("deny", (), None), id="unknown-agent"),
    pytest.param(_refund(owner="cus_1004"), ("deny", ("P-50",), None), id="another-customers-order"),
    pytest.param(_refund(amount_cents=-4000), ("deny", ("P-44",), None), id="negative-amount"),
    pytest.param(
        _refund("account_manager", amount_cents=4500, refunds_today_cents=9000),
        ("approval", ("P-48", "P-47"), "human"),
        id="am-3rd-refund-of-the-day",
    ),
    pytest.param(
        _call("tech_support", "update_email"),
        ("approval", ("P-60", "P-61"), "account_manager"),
        id="irreversible-by-tech-support",
    ),
    pytest.param(
        _call("account_manager", "update_email"),
        ("approval", ("P-60", "P-63"), "human"),
        id="irreversible-by-am",
    ),
    pytest.param(
        _call("payments", "cancel_subscription"),
        ("approval", ("P-60", "P-62"), "account_manager"),
        id="cancel-by-payments",
    ),
    pytest.param(
        _call("account_manager", "cancel_subscription"),
        ("approval", ("P-60", "P-64"), "customer"),
        id="cancel-by-am-is-the-customers-to-confirm",
    ),
    pytest.param(
        _call("payments", "cancel_subscription", owner="cus_1004"),
        ("deny", ("P-50", "P-60"), None),
        id="cancel-another-customers-subscription",
    ),
    pytest.param(
        _call("triage", "update_email"),
        ("deny", ("P-60",), None),
        id="irreversible-by-triage",
    ),
    pytest.param(_call("tech_support", "read_service_logs"), ("allow", ("P-12",), None), id="logs-by-tech"),
    pytest.param(_call("triage", "read_service_logs"), ("deny", (), None), id="logs-by-triage"),
    pytest.param(_call("payments", "send_email"), ("allow", ("P-13",), None), id="email-by-payments"),
    pytest.param(_call("triage", "send_email"), ("deny", (), None), id="email-by-triage"),
    pytest.param(_call("account_manager", "reverse_refund"), ("allow", ("P-14",), None), id="reverse-refund"),
]


@pytest.mark.parametrize(("request_", "expected"), CASES)
def test_sample_policies(
    engine: PolicyEngine, request_: PolicyRequest, expected: tuple[str, tuple[str, ...], str | None]
) -> None:
    decision = engine.decide(request_)
    assert _summary(decision) == expected
    for policy_id in decision.policy_ids:
        assert policy_id in decision.reason


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("tool", ["lookup_customer", "lookup_order", "create_ticket"])
def test_every_agent_may_look_up_and_open_tickets(engine: PolicyEngine, agent: str, tool: str) -> None:
    decision = engine.decide(_call(agent, tool))
    assert decision.outcome == "allow"
    assert decision.policy_ids == (("P-10",) if tool.startswith("lookup") else ("P-11",))


def test_forty_refunds_of_45_in_a_day_need_approval_from_the_third(engine: PolicyEngine) -> None:
    outcomes = [
        _summary(engine.decide(_refund(amount_cents=4500, refunds_today_cents=4500 * k))) for k in range(40)
    ]
    assert outcomes[:2] == [("allow", ("P-45",), None)] * 2
    assert outcomes[2:] == [("approval", ("P-48", "P-47"), "human")] * 38


def test_reason_names_the_agent_and_tool_when_nothing_permits(engine: PolicyEngine) -> None:
    assert engine.decide(_call("triage", "read_service_logs")).reason == (
        "no policy permits triage to read_service_logs"
    )


def test_missing_fact_fails_closed_naming_the_policy(engine: PolicyEngine) -> None:
    # Cedar alone would skip the erroring forbid P-48 and let P-45 allow the refund.
    request = _refund(refunds_today_cents=4500)
    context = {k: v for k, v in request.context.items() if k != "refunds_today_cents"}
    decision = engine.decide(dataclasses.replace(request, context=context))
    assert (decision.outcome, decision.policy_ids) == ("deny", ("P-48",))
    assert "refunds_today_cents" in decision.reason


def test_context_cedar_cannot_represent_is_an_error(engine: PolicyEngine) -> None:
    with pytest.raises(PolicyError, match="cannot be evaluated"):
        engine.decide(_refund(amount_cents=40.5))


def test_reserved_tool_names_are_refused(engine: PolicyEngine) -> None:
    with pytest.raises(PolicyError, match="reserved"):
        engine.decide(_call("payments", "refund:approve"))


def _policy_dir(tmp_path: Path, **files: str) -> Path:
    shutil.copytree(POLICIES, tmp_path / "policies")
    for name, text in files.items():
        (tmp_path / "policies" / f"{name}.cedar").write_text(text, encoding="utf-8")
    return tmp_path / "policies"


def test_parse_error_names_file_line_and_policy(tmp_path: Path) -> None:
    broken = (
        "// header; a comment may hold ';' and \"quotes\"\n"
        '@id("P-90")\npermit (principal, action, resource) when { context.note == "a;b" };\n'
        '\n@id("P-91")\nforbid (principal action);\n'
    )
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load(_policy_dir(tmp_path, zz_broken=broken))
    error = caught.value
    assert error.file is not None and error.file.endswith("zz_broken.cedar")
    assert (error.line, error.policy_id) == (5, "P-91")
    assert "zz_broken.cedar:5" in str(error)


def test_duplicate_id_across_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"duplicate policy id 'P-45'.*refunds\.cedar") as caught:
        PolicyEngine.load(
            _policy_dir(tmp_path, zz_dup='@id("P-45")\npermit (principal, action, resource);\n')
        )
    assert caught.value.policy_id == "P-45"
    assert caught.value.file is not None and caught.value.file.endswith("zz_dup.cedar")


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ('@id("P-1") permit (principal, action, resource);\npermit (principal, action, resource);', "@id", 2),
        ('@id("P-1")\n@approver("human")\nforbid (principal, action, resource);', "@approver", 1),
        ('@id("P-1") permit (principal == ?principal, action, resource);', "templates", None),
    ],
    ids=["missing-id", "approver-on-forbid", "template"],
)
def test_invalid_policies_are_refused_at_load(
    tmp_path: Path, text: str, message: str, line: int | None
) -> None:
    (tmp_path / "one.cedar").write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError, match=message) as caught:
        PolicyEngine.load(tmp_path)
    assert caught.value.line == line


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"no \*\.cedar"):
        PolicyEngine.load(tmp_path)

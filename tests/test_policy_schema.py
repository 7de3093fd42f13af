"""The Cedar schema derived from the tools' declarations, and the policies checked against it
when they load: a misspelled fact, attribute, tool, group or type is an error naming the
file, the line and the policy, not a call that fails closed at run time."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from corral import ConfigError, EntityType, Tool, ToolInput
from corral.supervisor.gateway._policy import PolicyEngine, PolicyError, check_policy_files
from tests.sample_tools import TOOLS

POLICIES = Path(__file__).resolve().parent.parent / "examples" / "support" / "policies"


def _actions(engine: PolicyEngine) -> dict[str, Any]:
    assert engine.schema is not None
    return dict(engine.schema[""]["actions"])


def test_the_sample_schema_comes_from_the_tools_declarations() -> None:
    engine = PolicyEngine.load(POLICIES, TOOLS)
    assert engine.schema is not None
    types = engine.schema[""]["entityTypes"]
    assert types["Order"] == {
        "memberOfTypes": ["Customer"],
        "shape": {
            "type": "Record",
            "attributes": {"owner": {"type": "Entity", "name": "Customer"}, "total_cents": {"type": "Long"}},
        },
    }
    assert types["Agent"] == {} and types["Customer"] == {}
    actions = _actions(engine)
    refund = actions["refund"]
    assert refund["memberOf"] == [{"id": "customer_owned"}]
    assert refund["appliesTo"]["principalTypes"] == ["Agent"]
    assert refund["appliesTo"]["resourceTypes"] == ["Order"]
    assert refund["appliesTo"]["context"]["attributes"] == {
        "account_age_days": {"type": "Long"},
        "refunds_today_cents": {"type": "Long"},
        "amount_cents": {"type": "Long"},
        "irreversible": {"type": "Boolean"},
        "customer": {"type": "Entity", "name": "Customer"},
    }
    # The approval pass is a member of its tool (so of the tool's groups) and of approval.
    assert actions["refund:approve"]["memberOf"] == [{"id": "refund"}, {"id": "approval"}]
    assert actions["refund:approve"]["appliesTo"] == refund["appliesTo"]
    assert actions["cancel_subscription"]["memberOf"] == [{"id": "customer_owned"}, {"id": "irreversible"}]
    assert actions["update_email"]["memberOf"] == [{"id": "irreversible"}]
    for group in ("approval", "irreversible", "lookups", "writes_to_customer", "customer_owned"):
        assert actions[group] == {}


def test_the_sample_policies_pass_the_check() -> None:
    check_policy_files(POLICIES, TOOLS)


def _copy(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    for name, text in files.items():
        (directory / f"{name}.cedar").write_text(text, encoding="utf-8")
    return directory


TYPO = (
    "// A refund over the order's total is never made.\n"
    '@id("P-90")\n'
    'forbid (principal, action in Action::"refund", resource)\n'
    "when {\n"
    "  context.amount_cent > resource.total_cents\n"
    "};\n"
)


def test_a_misspelled_fact_names_the_file_the_line_and_the_policy(tmp_path: Path) -> None:
    directory = _copy(tmp_path, zz_typo=TYPO)
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load(directory, TOOLS)
    error = caught.value
    assert (error.file, error.line, error.policy_id) == (str(directory / "zz_typo.cedar"), 5, "P-90")
    # Once, though Cedar reports it for both passes of the refund.
    assert str(error) == (
        f"{directory / 'zz_typo.cedar'}:5: policy P-90: context.amount_cent is not a fact of refund"
        " (did you mean amount_cents?)"
    )


def test_check_policy_files_raises_a_config_error_naming_the_file_and_line(tmp_path: Path) -> None:
    directory = _copy(tmp_path, zz_typo=TYPO)
    with pytest.raises(ConfigError) as caught:
        check_policy_files(directory, TOOLS)
    error = caught.value
    assert (error.path, error.line, error.field) == (str(directory / "zz_typo.cedar"), 5, "P-90")
    assert "zz_typo.cedar:5" in str(error) and "amount_cent" in str(error)


def test_a_parse_error_is_a_config_error_too(tmp_path: Path) -> None:
    directory = _copy(tmp_path, zz_broken='@id("P-91")\nforbid (principal action);\n')
    with pytest.raises(ConfigError) as caught:
        check_policy_files(directory, TOOLS)
    assert (caught.value.line, caught.value.field) == (1, "P-91")  # where the policy starts


@pytest.mark.parametrize(
    ("policy", "line", "message"),
    [
        pytest.param(
            'permit (principal, action == Action::"refnd", resource);',
            2,
            'Action::"refnd" is no tool, approval pass or group (did you mean refund?)',
            id="tool",
        ),
        pytest.param(
            'permit (principal,\n  action in Action::"lookup",\n  resource);',
            3,
            'Action::"lookup" is no tool, approval pass or group (did you mean lookups?)',
            id="group",
        ),
        pytest.param(
            'permit (principal, action == Action::"refund", resource)\n'
            "when { resource.ownr == context.customer };",
            3,
            "Order has no attribute ownr (did you mean owner?)",
            id="attribute",
        ),
        pytest.param(
            'permit (principal, action == Action::"refund", resource)\n'
            'when { context.amount_cents == "40" };',
            1,  # Cedar names no attribute: where the policy starts
            "the types Long and String are not compatible",
            id="type",
        ),
        pytest.param(
            'permit (principal in Team::"billing", action, resource);',
            2,
            "there is no entity type Team (types: Agent, Customer, Order, Subscription)",
            id="entity-type",
        ),
        pytest.param(
            'permit (principal, action == Action::"refund", resource is Subscription);',
            1,
            "it applies to no call: no action in its scope has such a principal and resource",
            id="impossible",
        ),
    ],
)
def test_what_validation_reports(tmp_path: Path, policy: str, line: int, message: str) -> None:
    directory = _copy(tmp_path, zz_new=f'@id("P-92")\n{policy}\n')
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load(directory, TOOLS)
    assert (caught.value.line, caught.value.policy_id) == (line, "P-92")
    assert str(caught.value) == f"{directory / 'zz_new.cedar'}:{line}: policy P-92: {message}"


def test_every_problem_is_listed_the_first_on_the_error(tmp_path: Path) -> None:
    directory = _copy(
        tmp_path,
        aa_first='@id("P-93")\npermit (principal, action == Action::"refund", resource)'
        " when { context.x };\n",
        zz_last='@id("P-94")\npermit (principal, action == Action::"nope", resource);\n',
    )
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load(directory, TOOLS)
    lines = str(caught.value).splitlines()
    assert [line.split(": policy ")[1].split(":")[0] for line in lines] == ["P-93", "P-94"]
    assert caught.value.policy_id == "P-93" and caught.value.file == str(directory / "aa_first.cedar")


def test_a_gateway_serving_some_of_the_tools_leaves_the_others_policies_unchecked() -> None:
    refund_only = [tool for tool in TOOLS if tool.name == "refund"]
    with pytest.raises(PolicyError, match="is no tool"):
        PolicyEngine.load(POLICIES, refund_only)  # strict: lookup_order... are unknown
    engine = PolicyEngine.load(POLICIES).bind(refund_only, strict=False)
    assert set(_actions(engine)) == {"refund", "refund:approve", "customer_owned", "approval", "irreversible"}


def test_binding_again_to_the_same_declarations_is_the_same_engine() -> None:
    engine = PolicyEngine.load(POLICIES, TOOLS)
    assert engine.bind(TOOLS) is engine
    assert engine.bind(TOOLS, strict=False) is engine
    assert engine.bind([tool for tool in TOOLS if tool.name == "refund"], strict=False) is not engine
    # Bound leniently, then asked strictly: checked strictly.
    refund_only = [tool for tool in TOOLS if tool.name == "refund"]
    lenient = PolicyEngine.load(POLICIES, refund_only, strict=False)
    with pytest.raises(PolicyError, match="is no tool"):
        lenient.bind(refund_only, strict=True)


class _Args(BaseModel):
    pass


class _Probe(Tool[_Args]):
    name = "probe"
    description = "declares what a test asks"
    arguments = _Args

    async def run(self, call: ToolInput[_Args]) -> dict[str, Any]:
        return {}


def _probe(**declared: Any) -> Tool[Any]:
    return type("Probe", (_Probe,), declared)()


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        pytest.param(
            [_probe(fact_types={"customer": str})], "fact 'customer' is set by the gateway", id="fact"
        ),
        pytest.param([_probe(groups=("refund",)), *TOOLS], "group 'refund' is a tool's name", id="group"),
        pytest.param([_probe(groups=("a:b",))], "group 'a:b' is reserved", id="group-colon"),
        pytest.param([_probe(fact_types={"ratio": float})], "type <class 'float'> is none of", id="float"),
        pytest.param([_probe(resource_type="Action")], "entity type 'Action' is reserved", id="type"),
        pytest.param(
            [_probe(resource_type=EntityType("Order", attributes={"id": str})), *TOOLS],
            "declares entity type Order unlike tool probe",
            id="two-orders",
        ),
    ],
)
def test_declarations_cedar_cannot_take_are_refused(tools: list[Tool[Any]], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        PolicyEngine.load(POLICIES, tools, strict=False)


def test_a_policy_on_an_empty_built_in_group_is_no_error(tmp_path: Path) -> None:
    """A team without irreversible tools may keep the sample's P-60: it applies to nothing."""
    (tmp_path / "p.cedar").write_text(
        '@id("P-1")\nforbid (principal, action in Action::"irreversible", resource)'
        ' unless { action in Action::"approval" };\n'
        '@id("P-2")\npermit (principal, action == Action::"probe", resource);\n'
    )
    reversible = _probe(changes_state=False)
    engine = PolicyEngine.load(tmp_path, [reversible])
    assert engine.policy_ids == ("P-1", "P-2")

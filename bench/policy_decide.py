"""What one Cedar authorization costs on the gateway's hot path: ``PolicyEngine.decide`` on the
sample policies bound to the sample tools, per outcome, in microseconds per call (best of
``--repeat`` runs of ``--number`` calls; one thread, no database).

    python bench/policy_decide.py [--number 20000] [--repeat 5] [--json]

A refund's resource is an ``Order`` entity with its owner as attribute and parent: the one
entity the engine builds per call (the schema and the action entities are built once, at
load). An allowed call is one Cedar evaluation; approval and denial are two (the direct call,
then the approval pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corral import EntityRef
from corral.supervisor.gateway._policy import PolicyEngine, PolicyRequest
from tests.sample_tools import TOOLS


def _refund(owner: str = "cus_1001", **facts: Any) -> PolicyRequest:
    ref = EntityRef("Customer", owner)
    return PolicyRequest(
        principal="payments",
        action="refund",
        resource_type="Order",
        resource_id="1001",
        context={"amount_cents": 4000, "account_age_days": 400, "refunds_today_cents": 0, **facts},
        customer="cus_1001",
        attributes={"owner": ref, "total_cents": 4000},
        parents=(ref,),
    )


CASES = {
    "allow (refund $40, P-45)": _refund(),
    "approval (refund $400, P-51)": _refund(amount_cents=40_000),
    "deny (another's order, P-50)": _refund("cus_1004"),
    "allow (lookup_customer, P-10)": PolicyRequest(
        principal="triage",
        action="lookup_customer",
        resource_type="Customer",
        resource_id="cus_1001",
        context={},
        customer="cus_1001",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    engine = PolicyEngine.load(REPO / "examples" / "support" / "policies", TOOLS)
    figures: dict[str, float] = {}
    for name, request in CASES.items():
        engine.decide(request)  # warm
        best = min(timeit.repeat(lambda r=request: engine.decide(r), number=args.number, repeat=args.repeat))
        figures[name] = round(best / args.number * 1e6, 1)
    if args.json:
        print(json.dumps({"us_per_call": figures}))
    else:
        for name, us in figures.items():
            print(f"{name:32} {us:6.1f} us")


if __name__ == "__main__":
    main()

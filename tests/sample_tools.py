"""The sample team's tools (``examples/support/tools.py``), loaded as every corral process loads
a team's tools file: under the one module name ``import_tools`` gives it, so that the classes
here are the gateway's, and tool classes the tests derive from them pickle into a child."""

from __future__ import annotations

from typing import Any

from corral.supervisor.config._tools_module import import_tools
from tests.conftest import REPO

_tools: Any = import_tools(str(REPO / "examples" / "support" / "tools.py"))

SCHEMAS = _tools.SCHEMAS
TOOLS = _tools.TOOLS
setup = _tools.setup
LookupOrder = _tools.LookupOrder
NoArgs = _tools.NoArgs
OrderArgs = _tools.OrderArgs
Refund = _tools.Refund
RefundArgs = _tools.RefundArgs
ReverseRefund = _tools.ReverseRefund
ReverseRefundArgs = _tools.ReverseRefundArgs

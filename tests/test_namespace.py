"""One import name: corral installs ``corral`` and nothing else at top level (``agents`` and
``supervisor`` are the import names of the OpenAI Agents SDK and of Supervisor), and
``corral`` exports exactly what users write against."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
import types

import pytest

import corral
from tests.conftest import REPO

OWN = ("bus", "agents", "router", "supervisor")


def test_the_distribution_installs_corral_alone_at_top_level() -> None:
    distribution = importlib.metadata.distribution("corral")
    top_level = (distribution.read_text("top_level.txt") or "").split()
    assert top_level == ["corral"]
    [script] = [e for e in distribution.entry_points if e.group == "console_scripts"]
    assert (script.name, script.value) == ("corral", "corral.supervisor.cli:main")


def public_names() -> set[str]:
    """What ``corral`` holds that is not private, its sub-packages aside."""
    return {
        name
        for name, value in vars(corral).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_corral_exports_exactly_its_all() -> None:
    public = public_names()
    assert public <= set(corral.__all__)  # nothing public beyond __all__ is loaded yet...
    loaded = {name: getattr(corral, name) for name in corral.__all__}
    # ... and once every name is loaded, the public names are exactly __all__, sorted.
    assert corral.__all__ == sorted(corral.__all__)
    assert public_names() == set(corral.__all__)
    assert set(dir(corral)) >= set(corral.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        corral.nope  # noqa: B018
    # Each name is the object of its home, and the errors form one tree.
    assert loaded["Tool"] is importlib.import_module("corral.supervisor.gateway._tools").Tool
    for name, value in loaded.items():
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, corral.CorralError), name


def test_importing_corral_bus_loads_no_supervisor() -> None:
    """An agent process imports corral.bus, and a tool author's file the tool contract: neither
    loads the control plane."""
    code = (
        "import sys, corral, corral.bus; corral.Tool;"
        " print([m for m in ('corral.supervisor.core', 'corral.supervisor.store', 'cedarpy')"
        " if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_imports_the_folders_by_their_top_level_names() -> None:
    """A checkout's folders are importable from its root as ``bus``, ``agents``...: a module
    imported that way would be a second copy (its classes not the same classes)."""
    found = []
    for folder in ("bus", "agents", "router", "supervisor", "tests", "bench", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OWN
                ]
    assert found == []


def test_the_readmes_tool_example_is_a_tool() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in readme.split("```python")[1:] if "from corral import" in b]
    plain, declared = blocks  # a Tool, then the same refund declared as SQL (in the same namespace)
    namespace: dict[str, object] = {}
    exec(compile(plain.split("```", 1)[0], "README.md", "exec"), namespace)
    [tool] = namespace["TOOLS"]  # type: ignore[misc]
    assert isinstance(tool, corral.Tool)
    assert tool.schema()["required"] == ["order_id", "amount_cents"]
    exec(compile(declared.split("```", 1)[0], "README.md", "exec"), namespace)
    sql_tool = namespace["Refund"]()  # type: ignore[operator]
    assert isinstance(sql_tool, corral.SqlTool)
    statements = sql_tool.declared_statements()
    assert [s.types for s in statements] == [("text", "text"), ("text", "bigint", "text")]

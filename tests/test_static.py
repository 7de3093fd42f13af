"""The linters and the type checker are part of the suite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_direction_holds() -> None:
    """corral.bus < corral.router < corral.agents < corral.supervisor (import-linter's
    contract in pyproject.toml): no layer imports one above it."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bus < router < agents < supervisor KEPT" in result.stdout
    # rich wraps the report at the terminal's width: compare it unwrapped.
    report = " ".join(result.stdout.split())
    assert "inside the supervisor: cli > api > stack > core > gateway > audit > store > config KEPT" in report


MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 80
SIZED = ("bus", "agents", "router", "supervisor", "corral", "examples", "tests")


def test_modules_and_functions_stay_small() -> None:
    """Modules under ~500 lines (tests aside), functions under ~80, outside bench/."""
    found = []
    for folder in SIZED:
        for path in sorted((REPO / folder).glob("**/*.py")):
            if folder == "corral" and path.parent != REPO / "corral":
                continue  # corral/ links to the other folders: each file is measured once
            source = path.read_text()
            name = path.relative_to(REPO)
            if folder != "tests" and (lines := source.count("\n")) > MAX_MODULE_LINES:
                found.append(f"{name}: {lines} lines")
            for node in ast.walk(ast.parse(source, str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not found, "\n".join(found)

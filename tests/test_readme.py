"""The README's command blocks, run in order as a new user would, twice in a row in one
directory: every line gives the output and exit code its comment documents."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO
from tests.readme_runner import blocks, run_readme

README = REPO / "README.md"


def test_the_readme_marks_the_first_hour() -> None:
    commands = [line.command for block in blocks(README) for line in block]
    assert commands[0] == "corral demo --once"
    assert "corral up" in commands and commands[-2:] == ["corral down", "corral reset --yes"]
    assert any(c.startswith("corral approve a-…") for c in commands)


def test_the_readme_examples_twice_in_a_row(tmp_path: Path) -> None:
    # The second pass runs where the first left off: the demo and `corral reset` leave
    # nothing behind that changes a documented outcome.
    run_readme(README, tmp_path)
    run_readme(README, tmp_path)

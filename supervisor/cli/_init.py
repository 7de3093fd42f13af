"""`corral init DIR`: write a starter team that runs as it is.

The team is the directory ``starter/`` beside this module, copied as it is: a
``corral.yaml`` with two agents (triage hands order questions to orders), their
instructions, one tool in ``tools.py``, one Cedar policy, the offline model's rules
(``scripted.yaml``) and the conversations ``corral demo`` checks (``scenarios.yaml``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from corral.supervisor.cli._shared import EXIT_CONFIG, app, complain, say

STARTER = Path(__file__).resolve().parent / "starter"
"""The starter team's files."""

_SKIP = {"__pycache__"}


def starter_files() -> list[Path]:
    """The starter team's files, relative to ``STARTER``, sorted."""
    return sorted(
        path.relative_to(STARTER)
        for path in STARTER.rglob("*")
        if path.is_file() and not _SKIP.intersection(path.relative_to(STARTER).parts)
    )


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the team (new, or an empty directory)")],
) -> None:
    """Write a starter team into DIRECTORY: corral.yaml, instructions, one tool in
    tools.py, one Cedar policy, scripted model rules and sample conversations. It runs as
    it is (`corral demo --once -c DIRECTORY/corral.yaml`). A DIRECTORY that exists and is
    not empty is left alone (exit 2)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        what = "is not a directory" if not directory.is_dir() else "is not empty"
        complain(f"{directory} {what}: nothing written; give a new or an empty directory")
        raise typer.Exit(EXIT_CONFIG)
    files = starter_files()
    directory.mkdir(parents=True, exist_ok=True)
    for relative in files:
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STARTER / relative, target)
    config = directory / "corral.yaml"
    say(f"wrote a starter team in {directory}:")
    for relative in files:
        say(f"  {relative}")
    say("")
    say("Try it (starts the team, sends scenarios.yaml's conversations, checks each outcome):")
    say(f"  corral demo --once -c {config}")
    say("Or run it and talk to it:")
    say(f"  corral up -c {config}")
    say(f'  corral send --wait --customer cus_1 "Where is my order 1001?" -c {config}')

"""`corral reset`: delete this directory's corral state, so the next `corral up` starts from
the sample data as a fresh clone would."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from corral.supervisor.cli._shared import ConfigOption, _load, app, console, err_console
from corral.supervisor.stack._runtime import Runtime

EXIT_REFUSED = 1

STATE_ENTRIES = frozenset(
    {"creds", "logs", "nats", "postgres", "demo", "runtime.json", "runtime.json.tmp", "revoked.json"}
)
"""What corral writes in a state directory; reset deletes nothing that holds anything else."""


def _not_corrals(state_dir: Path, config_dir: Path) -> list[str]:
    """The entries of ``state_dir`` that corral did not write (or the directory itself, when
    it is one a user keeps other things in: the config's, the home or the current one)."""
    keep = {Path.cwd().resolve(), Path.home().resolve(), config_dir.resolve(), Path("/")}
    if state_dir.resolve() in keep:
        return [str(state_dir)]
    return sorted(entry.name for entry in state_dir.iterdir() if entry.name not in STATE_ENTRIES)


@app.command()
def reset(
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting")] = False,
) -> None:
    """Delete the state directory (the embedded NATS and PostgreSQL data with every
    conversation, approval and refund, the seeds, the logs, the demo's state), after asking.
    Refused while a stack runs from here (`corral down` first)."""
    settings = _load(config)
    state_dir = settings.state_dir
    for where in (state_dir, state_dir / "demo"):
        running = Runtime.read(where)
        if running is not None:
            err_console.print(
                f"corral is running from {where} (pid {running.pid}): stop it first "
                "(`corral down`, or Ctrl-C the demo)",
                highlight=False,
            )
            raise typer.Exit(EXIT_REFUSED)
    if not state_dir.exists():
        console.print(f"nothing to reset: {state_dir} does not exist", highlight=False)
        return
    strangers = _not_corrals(state_dir, settings.path.parent)
    if strangers:
        err_console.print(
            f"{state_dir} holds what corral did not write ({', '.join(strangers)}): "
            "nothing deleted; is `state_dir` right?",
            highlight=False,
        )
        raise typer.Exit(EXIT_REFUSED)
    kept = [
        name
        for name, url in (("NATS_URL", settings.nats_url), ("DATABASE_URL", settings.database_url))
        if url
    ]
    if kept:
        console.print(
            f"Not touched: the servers {' and '.join(kept)} name are yours; only {state_dir} is deleted.",
            highlight=False,
        )
    if not yes:
        if not sys.stdin.isatty():
            err_console.print(
                f"corral reset would delete {state_dir}: pass --yes to confirm", highlight=False
            )
            raise typer.Exit(EXIT_REFUSED)
        if not typer.confirm(f"Delete {state_dir} and everything corral stored in it?"):
            console.print("nothing deleted")
            raise typer.Exit(EXIT_REFUSED)
    shutil.rmtree(state_dir)
    console.print(f"deleted {state_dir}; the next `corral up` starts from the sample data", highlight=False)

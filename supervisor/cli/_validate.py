"""`corral validate`: check the config and everything it names, without starting anything."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from corral.supervisor.cli._shared import EXIT_CONFIG, ConfigOption, app, console, err_console

if TYPE_CHECKING:
    from corral.supervisor.errors import ConfigError


@app.command()
def validate(config: ConfigOption = None) -> None:
    """Check the config, the instructions, the tools, the Cedar policies, the scripted
    model's rules and the model tiers' API keys: exit 0 listing what was checked, or 2
    naming the file and line of the first problem. `corral up` runs the same checks first."""
    from corral.supervisor.errors import ConfigError
    from corral.supervisor.stack._validate import validate as check

    try:
        _, checked = check(config)
    except ConfigError as exc:
        print_invalid(exc)
        raise typer.Exit(EXIT_CONFIG) from None
    for item in checked:
        console.print(f"{item.what}: {item.detail}", highlight=False)
    console.print("ok", highlight=False)


def print_invalid(exc: ConfigError) -> None:
    """A problem ``corral validate`` found, as ``validate`` and ``up`` print it."""
    err_console.print(f"[red]invalid:[/red] {exc}", highlight=False)

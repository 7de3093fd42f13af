"""The ``corral`` command line: shared helpers (``_shared``), and one module per command
group (``_stack``: running the team; ``_talk``: talking to it, and ``_status`` what
``corral status`` reports; ``_conversations``: what happened to a conversation; ``_init``:
a starter team; ``_demo``: the demo; ``_reset``: deleting the state; ``_services``: the
services; ``_operator``: kill switches, credentials, audit, approvals, rollback).

Every command module imports only typer and light modules at its top, and what a command
needs (NATS, PostgreSQL, Cedar, litellm) inside it: ``corral --help`` and a command's
start pay only for what it uses (``bench/cli_startup.py`` measures it).
"""

import os


def main() -> None:
    """Entry point of the ``corral`` console script."""
    # Each group module registers its commands on the shared app when imported; the app
    # module imports none of them back.
    from corral.supervisor.cli import (  # noqa: F401
        _conversations,
        _demo,
        _init,
        _operator,
        _reset,
        _services,
        _stack,
        _talk,
        _validate,
    )
    from corral.supervisor.cli._shared import app

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    app()

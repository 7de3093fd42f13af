"""The ``corral`` command line: shared helpers (``_shared``), and one module per command
group (``_stack``: running the team; ``_talk``: talking to it; ``_demo``: the demo;
``_reset``: deleting the state; ``_services``: the services; ``_operator``: kill switches,
credentials, audit, approvals, rollback)."""

import os


def main() -> None:
    """Entry point of the ``corral`` console script."""
    # Each group module registers its commands on the shared app when imported; the app
    # module imports none of them back.
    from corral.supervisor.cli import _demo, _operator, _reset, _services, _stack, _talk  # noqa: F401
    from corral.supervisor.cli._shared import app

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    app()

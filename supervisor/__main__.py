"""``python -m corral.supervisor`` is the ``corral`` command."""

from corral.supervisor.cli import main

main()

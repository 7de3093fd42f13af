"""``python -m corral.supervisor`` is the ``corral`` command."""

from corral.supervisor._cli import main

main()

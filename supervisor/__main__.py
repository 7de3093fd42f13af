"""``python -m supervisor`` is the ``corral`` command."""

from supervisor._cli import main

main()

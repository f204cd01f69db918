"""``python -m introspect``: the same as the ``introspect`` command."""

from .cli import main

main(prog_name="introspect")

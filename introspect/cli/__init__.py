"""The ``introspect`` command: a thin layer of click commands over the library."""

from .commands import main

__all__ = ["main"]

"""One record of everything a ``watch`` changed in the process, undone in reverse order.

Module, parameter and optimizer hooks, signal handlers, the event-file checksum patch, the entry
in the table of watched models, compiled code to forget, the writer to flush or close: each is
registered with the function that undoes it, the moment it is made. ``undo()`` runs them last
first, each once, even when one of them fails, on every exit path (normal, exception, Ctrl-C,
SIGTERM, a failed ``watch()`` half way through attaching).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import IntrospectWarning, warn

__all__ = ["Registry", "ACTIVE"]

ACTIVE: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
"""Which models are being watched right now. Weak, so a watcher left open never keeps a model alive."""


class Registry:
    """A stack of undo actions. ``undo()`` is idempotent and never raises for one failed action."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def hook(self, handle: Any) -> Any:
        """A ``RemovableHandle`` (its ``remove()`` is idempotent); returned for chaining."""
        self._undo.append(("hook", handle.remove))
        return handle

    def undo(self) -> None:
        """Undo everything, last first. A failing action warns and the rest still run."""
        while self._undo:
            what, action = self._undo.pop()
            try:
                action()
            except Exception as e:  # e.g. a full disk when the writer flushes: never lose the rest
                warn(f"introspect: could not undo {what}: {type(e).__name__}: {e}", IntrospectWarning)

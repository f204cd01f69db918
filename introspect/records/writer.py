"""``GuardedWriter``: every write of a watch goes through it, so that a failing writer stops writing
with one warning and never stops training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import IntrospectWarning, warn
from ..runtime.registry import Registry
from . import eventfile
from .sinks import open_writer

__all__ = ["GuardedWriter"]


class GuardedWriter:
    """The run's writer behind one door: the first call that fails disables writing, with one
    warning (through ``on_failure``), and training goes on. ``None`` on a rank that does not write.

    It also owns the writer's end: a writer ``watch`` opened is closed, one the user passed is
    flushed (never closed), and the event-file checksum patch is undone first.
    """

    def __init__(self, writer: Any, on_failure: Callable[[Exception], None], owned: bool = False) -> None:
        self.writer = writer
        self.raw = writer  # kept after a failure: finish() still flushes what was written
        self.owned = owned
        self._on_failure = on_failure

    @classmethod
    def open(cls, target: Any, registry: Registry, on_failure: Callable[[Exception], None]) -> GuardedWriter:
        """The writer for ``target`` (a writer, a path, None; ``False``: this rank writes nothing),
        its end and its checksum patch registered in ``registry``."""
        raw, owned = open_writer(target) if target is not False else (None, False)
        guarded = cls(raw, on_failure, owned)
        if raw is not None:
            registry.add("the writer", guarded.finish)
            # Same bytes, checksummed without a pure-Python byte loop (see eventfile.py).
            if eventfile.speed_up(raw):
                registry.add("the event-file checksum", lambda: eventfile.restore(raw))
        return guarded

    def __bool__(self) -> bool:
        return self.writer is not None

    def call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """``writer.method(*args, **kwargs)``; False when there is no writer or it failed."""
        return self.run(lambda writer: getattr(writer, method)(*args, **kwargs))

    def run(self, write: Callable[..., object], *args: Any) -> bool:
        """``write(writer, *args)`` (what it returns is not used); False when there is no writer or
        it failed."""
        writer = self.writer
        if writer is None:
            return False
        try:
            write(writer, *args)
        except Exception as e:
            self.writer = None
            self._on_failure(e)
            return False
        return True

    def finish(self) -> None:
        """Close a writer we opened; flush one the user passed (never close theirs)."""
        if self.raw is None:
            return
        try:
            if self.owned:
                self.raw.close()
            else:
                self.raw.flush()
        except Exception as e:  # a full disk must not turn a finished run into a crash
            warn(f"introspect: could not flush the writer: {e}", IntrospectWarning)

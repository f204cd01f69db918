"""The debugger's findings during a watch, and the guarded writer every probe writes through."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..diagnostics import Alert, alerts_markdown
from ..sinks import ALERTS_TAG

__all__ = ["Findings", "GuardedWriter", "logger"]

logger = logging.getLogger("introspect")
logger.addHandler(logging.NullHandler())  # the application decides where findings go


class GuardedWriter:
    """The run's writer behind one door: the first call that fails disables writing, with one
    warning (through ``on_failure``), and training goes on. ``None`` on a rank that does not write."""

    def __init__(self, writer: Any, on_failure: Callable[[Exception], None]) -> None:
        self.writer = writer
        self._on_failure = on_failure

    def __bool__(self) -> bool:
        return self.writer is not None

    def call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """``writer.method(*args, **kwargs)``; False when there is no writer or it failed."""
        writer = self.writer
        if writer is None:
            return False
        try:
            getattr(writer, method)(*args, **kwargs)
        except Exception as e:
            self.writer = None
            self._on_failure(e)
            return False
        return True

    def run(self, write: Callable[..., None], *args: Any) -> bool:
        """``write(writer, *args)`` for writing that is more than one method call."""
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


class Findings:
    """What the debugger found, each (kind, where) once, in ``alerts`` and in ``diagnostics/alerts``."""

    def __init__(self, writer: GuardedWriter) -> None:
        self.alerts: list[Alert] = []
        self._seen: set[tuple[str, str]] = set()
        self._writer = writer

    def add(self, alert: Alert) -> bool:
        """Record a finding once per (kind, where); False when it was already known."""
        key = (alert.kind, alert.where)
        if key in self._seen:
            return False
        self._seen.add(key)
        self.alerts.append(alert)
        logger.warning("%s", alert)
        self._writer.call("add_text", ALERTS_TAG, alerts_markdown(self.alerts), alert.step)
        return True

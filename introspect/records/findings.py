"""The debugger's findings during a watch, and the guarded writer every probe writes through."""

from __future__ import annotations

import logging

from ..debugger.alerts import Alert, alerts_markdown
from .tags import ALERTS_TAG
from .writer import GuardedWriter

__all__ = ["Findings", "GuardedWriter", "logger"]

logger = logging.getLogger("introspect")
logger.addHandler(logging.NullHandler())  # the application decides where findings go


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

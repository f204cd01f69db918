"""The debugger's findings during a watch, and the guarded writer every probe writes through."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..debugger.alerts import ROWS_PER_KIND, Alert, alerts_markdown
from ..debugger.story import Story
from .tags import ALERTS_TAG
from .writer import GuardedWriter

__all__ = ["Findings", "GuardedWriter", "logger"]

logger = logging.getLogger("introspect")
logger.addHandler(logging.NullHandler())  # the application decides where findings go


class Findings:
    """What the debugger found, each (kind, where) once, in ``alerts`` and in ``diagnostics/alerts``.

    Each finding is linked to the root finding it follows from as it arrives (``story``, see
    :mod:`introspect.debugger.story`). The text is written at most once per step: at the end of a
    step, that step's new findings (:meth:`flush`), and at the end of the watch the whole story
    once more (:meth:`close`) unless one text already held all of it. So the event file grows
    with the number of findings, not with its square (a table rewritten on every new finding made
    531 MB from 2,937 findings), and a table lists at most ``ROWS_PER_KIND`` findings of one kind
    per step, counting the rest.
    """

    def __init__(self, writer: GuardedWriter, order: Iterable[str] = (), window: int = 10, lookback: int = 3) -> None:
        self.alerts: list[Alert] = []
        self._seen: set[tuple[str, str]] = set()
        self._writer = writer
        self.story = Story(order, window, lookback)
        self._pending: list[Alert] = []
        self._texts = 0  # how many alerts texts were written
        self._last_step = 0
        self._complete = True  # the last text written holds every finding, uncapped, as linked now
        self._closed = False

    def add(self, alert: Alert) -> bool:
        """Record a finding once per (kind, where); False when it was already known."""
        key = (alert.kind, alert.where)
        if key in self._seen:
            return False
        self._seen.add(key)
        self.story.link(alert)
        self.alerts.append(alert)
        self._pending.append(alert)
        self._complete = False
        logger.warning("%s", alert)
        if self._closed:  # found after the watch ended (e.g. by finish()): the whole story again
            self._closed = False
            self.close(alert.step)
        return True

    def flush(self, step: int) -> None:
        """Write the findings that are new since the last write, as one text at ``step``."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        self._write(alerts_markdown(rows), step)
        self._complete = self._texts == 1 and len(rows) == len(self.alerts) and not _capped(rows)

    def close(self, step: int) -> None:
        """The end of the watch: the whole story, unless the one text written already holds it."""
        if self._closed:
            return
        self._closed = True
        if self._texts == 0:
            self.flush(step)
            return
        self._pending = []
        if not self._complete:
            self._write(alerts_markdown(self.alerts), step)
            self._complete = True

    def _write(self, text: str, step: int) -> None:
        # Never behind an earlier text of this tag: TensorBoard would purge the later ones.
        self._last_step = max(self._last_step, step)
        self._texts += 1
        self._writer.call("add_text", ALERTS_TAG, text, self._last_step)


def _capped(rows: list[Alert]) -> bool:
    """Whether a table of ``rows`` leaves some out (more than ROWS_PER_KIND of a kind at a step)."""
    counts: dict[tuple[int, str], int] = {}
    for alert in rows:
        key = (alert.step, alert.kind)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > ROWS_PER_KIND:
            return True
    return False

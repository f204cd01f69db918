"""A share of the run's wall time that optional work on the training thread may spend.

Two kinds of work a watch does only because it is useful, not because a step needs it, and whose
cost on a sick model has no natural bound:

* the live matplotlib figures (the health map, the gradient-flow figure): 0.1–0.9 s each, drawn
  whenever there is news — on a model that dies layer by layer, news comes every few logging steps;
* escalations (``live/clock.py``): a cheap every-step signal (one parameter's gradient norm
  jumping, the loss jumping, a gradient-norm spike) makes the next steps logging steps; on the same
  model such a signal fires every 20–30 steps, and each logging step costs several bare steps.

Both are kept to a share of the run's time so far, as a token bucket in time: what the work took
(measured) must be earned back at ``share`` x the elapsed time before more is granted. The first
grant comes at once (nothing has been spent yet), so the first picture of a finding and the first
escalation are never late; escalations may overdraw the bucket by one (:meth:`TimeShare.grant`);
a run that keeps asking gets the share and no more. Drawing at close
and escalations after a NaN/Inf are not asked for: they always happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RENDER_SHARE", "TimeShare"]

RENDER_SHARE = 0.005
"""The most of a run's wall time (so far) the live figures may take before close."""


class TimeShare:
    """Spend at most ``share`` of the wall time since the first :meth:`start` (``now``: the
    clock, injectable for tests). ``spent`` is what was charged; ``granted``/``refused`` count
    the answers of :meth:`grant`."""

    def __init__(self, share: float, now: Callable[[], float] = time.perf_counter) -> None:
        self.share = share
        self.now = now
        self.began: float | None = None
        self.spent = 0.0
        self.granted = 0
        self.refused = 0
        self._latest = 0.0

    def start(self) -> None:
        """The run's time counts from the first call (the first step, or the first figure)."""
        if self.began is None:
            self.began = self.now()

    def fits(self, estimate: float = 0.0, *, first_at_once: bool = True) -> bool:
        """Whether ``estimate`` more seconds keep the spending within the share. With nothing spent
        yet, ``first_at_once``: yes, whatever the cost (the first grant is never late)."""
        self.start()
        assert self.began is not None
        if first_at_once and self.spent <= 0.0:
            return True
        return self.spent + estimate <= self.share * (self.now() - self.began)

    def grant(self) -> bool:
        """Whether more work of unknown cost may begin, counted: yes once everything spent before
        the latest grant is earned back. The budget may so be overdrawn by one grant's cost — two
        may come in a row (a healthy run's rare false alarm does not cost the next, real one its
        grant), a third waits until the share of the elapsed time has paid for the first."""
        self.start()
        assert self.began is not None
        if self.spent - self._latest <= self.share * (self.now() - self.began):
            self.granted += 1
            self._latest = 0.0
            return True
        self.refused += 1
        return False

    def charge(self, seconds: float) -> None:
        """``seconds`` of granted work were spent."""
        seconds = max(0.0, seconds)
        self.spent += seconds
        self._latest += seconds  # the cost of the latest grant so far

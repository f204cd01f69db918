"""The step clock: which step a training forward belongs to, and what each step does.

Three modes, one clock:

* default: one step per training-mode, grad-enabled forward of the root;
* ``optimizer=``: one step per ``optimizer.step()`` (forwards in between accumulate into it);
* ``step_fn=``: the step an external counter (a trainer's ``global_step``) names.

Each step gets a :class:`StepPlan` when it opens; probes read it and never decide cadence on their
own. Step 0 (and, with ``step_fn=``, a resumed run's first step) is always a logging step, and so
are the steps of an escalation, whatever ``every`` says: when a cheap every-step signal fires (a
NaN/Inf, a gradient-norm spike, one parameter's gradient norm jumping), the next
``Thresholds.escalate_steps`` steps log (``request_log(steps)``), so the per-module views see the
fault at once instead of up to ``every`` steps later. Whether a step logs is decided here alone.

The escalations of the cheap signals (``request_log(steps, budgeted=True)``) are kept to
``Thresholds.escalate_share`` of the run's time (a :class:`~introspect.probes.time_share.TimeShare`):
on a model that keeps changing (a deep ReLU stack dying layer by layer) a parameter's gradient
norm jumps every few dozen steps, and each escalation's logging steps cost several bare steps. The
first escalation is granted at once; the extra time its logging steps took (each one's time over
the median of the recent steps that did not log) is charged, and an escalation is granted once
everything charged before the latest one is earned back at that share of the elapsed time (so a
second may follow the first at once: a healthy run's rare false alarm must not cost a real fault
its escalation; a third waits). A refused one is counted (``escalations_skipped``; ``w.report()``
says so). An escalation after a NaN/Inf is never refused: a non-finite step is worth its logging
steps.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from ..probes.base import StepPlan
from ..probes.time_share import TimeShare
from .config import read_step

__all__ = ["StepPlan", "StepClock"]


class StepClock:
    def __init__(
        self,
        *,
        every: int,
        check_every: int,
        image_every: int,
        writes: bool,
        counts_optimizer_steps: bool,
        step_fn: Callable[[], int] | None,
        shared: bool = False,
        escalate_share: float = 1.0,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``shared``: every rank plans the logging steps, writing or not, because their statistics
        are combined by collectives every rank must join (sharded training, see ``records/shards.py``);
        the cadence is then ``every`` alone, the same on every rank (no ``force_log`` after one
        rank's NaN, which the others cannot know of). ``escalate_share``: the most of the run's time
        the budgeted escalations may take (1: no limit); ``now``: the clock that measures it."""
        self.every = every
        self.check_every = check_every
        self.image_every = image_every
        self.writes = writes
        self.counts_optimizer_steps = counts_optimizer_steps
        self.step_fn = step_fn
        self.shared = shared
        self.step = 0  # the open (or latest) step
        self.next_step = 0
        self.force_log = True  # the first step always logs
        self.escalated = 0
        """How many of the next steps still log because a signal fired (an escalation)."""
        self.budget = TimeShare(escalate_share, now)
        """The escalations' share of the run's time (granted/refused count the budgeted requests)."""
        self._opened_at: float | None = None  # when the open step began (its plan)
        self._open_kind = ""  # "plain": did not log; "escalated": logged for an escalation only
        self._plain: deque[float] = deque(maxlen=16)  # the recent non-logging steps' times

    @property
    def escalations(self) -> int:
        """How many budgeted escalations were granted."""
        return self.budget.granted

    @property
    def escalations_skipped(self) -> int:
        """How many budgeted escalations were refused (the budget was spent)."""
        return self.budget.refused

    def request_log(self, steps: int = 1, *, budgeted: bool = False) -> bool:
        """Make the next ``steps`` steps logging steps (an escalation: after a NaN/Inf, a spike),
        unless the ranks share the cadence. A request during an escalation extends it to at
        least ``steps`` from now, never adds up. ``budgeted``: a cheap signal's escalation, granted
        only within ``escalate_share`` (see the module docstring). Whether it was granted."""
        if self.shared:
            return False
        steps = int(steps)
        if budgeted:
            if steps <= self.escalated:
                return True  # these steps log already (another signal of the same step)
            if not self.budget.grant():
                return False
        self.escalated = max(self.escalated, steps)
        return True

    def external_step(self) -> int:
        assert self.step_fn is not None
        return read_step(self.step_fn)

    def forward_ends_step(self, open_step: int) -> bool:
        """Whether a training forward now starts a new step after ``open_step``: always by
        default, never with ``optimizer=`` (its ``step()`` ends steps), and with ``step_fn=`` when
        the external counter has moved on."""
        if self.counts_optimizer_steps:
            return False
        return self.step_fn is None or self.external_step() != open_step

    def take(self) -> int:
        """The number of the step that opens now."""
        step = self.next_step if self.step_fn is None else self.external_step()
        self.step, self.next_step = step, step + 1
        return step

    def plan(self) -> StepPlan:
        """Open the next step and say what it does."""
        self._account(self.budget.now())
        step = self.take()
        escalated = self.escalated > 0
        due = step % self.every == 0 or self.force_log
        logging = (self.writes or self.shared) and (due or escalated)
        self._open_kind = "plain" if not logging else ("escalated" if not due else "")
        self.force_log = False
        self.escalated = max(0, self.escalated - 1)
        return StepPlan(
            step=step,
            logging=logging,
            checking=self.check_every > 0 and step % self.check_every == 0,
            images=self.writes and step % self.image_every == 0,
        )

    def _account(self, now: float) -> None:
        """The step that just ended (from its plan to the next one's): a step that did not log
        joins the typical step time; an escalation's logging step is charged what it took over
        that (all of it before any step without logging was seen)."""
        opened, self._opened_at = self._opened_at, now
        self.budget.start()
        if opened is None:
            return
        took = now - opened
        if self._open_kind == "plain":
            self._plain.append(took)
        elif self._open_kind == "escalated":
            self.budget.charge(took - (statistics.median(self._plain) if self._plain else 0.0))

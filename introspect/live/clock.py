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
"""

from __future__ import annotations

from collections.abc import Callable

from ..probes.base import StepPlan
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
    ) -> None:
        """``shared``: every rank plans the logging steps, writing or not, because their statistics
        are combined by collectives every rank must join (sharded training, see ``records/shards.py``);
        the cadence is then ``every`` alone, the same on every rank (no ``force_log`` after one
        rank's NaN, which the others cannot know of)."""
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

    def request_log(self, steps: int = 1) -> None:
        """Make the next ``steps`` steps logging steps (an escalation: after a NaN/Inf, a spike),
        unless the ranks share the cadence. A request during an escalation extends it to at
        least ``steps`` from now, never adds up."""
        if not self.shared:
            self.escalated = max(self.escalated, int(steps))

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
        step = self.take()
        escalated = self.escalated > 0
        logging = (self.writes or self.shared) and (step % self.every == 0 or self.force_log or escalated)
        self.force_log = False
        self.escalated = max(0, self.escalated - 1)
        return StepPlan(
            step=step,
            logging=logging,
            checking=self.check_every > 0 and step % self.check_every == 0,
            images=self.writes and step % self.image_every == 0,
        )

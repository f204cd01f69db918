"""The step clock: which step a training forward belongs to, and what each step does.

Three modes, one clock:

* default: one step per training-mode, grad-enabled forward of the root;
* ``optimizer=``: one step per ``optimizer.step()`` (forwards in between accumulate into it);
* ``step_fn=``: the step an external counter (a trainer's ``global_step``) names.

Each step gets a :class:`StepPlan` when it opens; probes read it and never decide cadence on their
own. Step 0 (and, with ``step_fn=``, a resumed run's first step) is always a logging step, and so is
the step after a NaN/Inf (``force_log``), whatever ``every`` says.
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

    def request_log(self) -> None:
        """Make the next step a logging step (after a NaN/Inf), unless the ranks share the cadence."""
        if not self.shared:
            self.force_log = True

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
        logging = (self.writes or self.shared) and (step % self.every == 0 or self.force_log)
        self.force_log = False
        return StepPlan(
            step=step,
            logging=logging,
            checking=self.check_every > 0 and step % self.check_every == 0,
            images=self.writes and step % self.image_every == 0,
        )

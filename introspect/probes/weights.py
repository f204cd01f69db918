"""``weights/{param}``: the values the step's forward used, taken when a logging step opens."""

from __future__ import annotations

from ..records.tags import tag
from .base import Probe, StepPlan


class Weights(Probe):
    name = "weights"
    builtin = True

    def on_step_start(self, plan: StepPlan) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return
        for name, param in self.ctx.params.items():
            buffer.add_histogram(tag("weights", name), param)

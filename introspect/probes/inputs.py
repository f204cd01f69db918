"""``log_inputs=True``: the first training batch as an image grid (``data/inputs``), and the data
checks (NaN/Inf, constant images, 0-255 values, duplicates) on it as findings."""

from __future__ import annotations

from torch import nn

from ..analysis.data import log_input_batch
from ..records.tags import INPUTS_TAG
from ..runtime.tensors import named_float_tensors
from .base import Probe

__all__ = ["Inputs"]


class Inputs(Probe):
    name = "inputs"
    builtin = True

    def on_first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        writer = self.ctx.writer
        if not writer:
            return
        tensors = [t for _, t in named_float_tensors((args, kwargs))]
        if not tensors:
            return
        try:
            alerts = log_input_batch(tensors[0], writer.deferred(), INPUTS_TAG, self.ctx.clock.next_step)
        except Exception as e:
            self.ctx.disable("<inputs>", None, e)
            return
        for alert in alerts:
            self.ctx.findings.add(alert)

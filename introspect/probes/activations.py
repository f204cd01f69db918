"""``activations/{module}``: a histogram of every floating output of each watched module."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..records.tags import tag
from .base import Probe


class Activations(Probe):
    name = "activations"
    builtin = True

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return None
        for where, _, tensor in self.ctx.outputs(name, output):
            # The non-finite check summed this tensor already: the histogram reuses that pass.
            buffer.add_histogram(tag("activations", where), tensor, buffer.known_sum(tensor))
        return None

"""``update_ratio/{param}`` with ``optimizer=``: how far ``optimizer.step()`` moved each parameter,
as ``|w_after - w_before| / |w_before|``, on logging steps."""

from __future__ import annotations

import torch

from ..records.shards import is_dtensor
from ..records.tags import tag
from .base import Probe, ProbeContext


class UpdateRatio(Probe):
    name = "update_ratio"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self) -> None:
        for name, param in self.ctx.params.items():
            if param.grad is not None:
                self._before[name] = param.detach().clone()

    def on_after_optimizer_step(self) -> None:
        buffer = self.ctx.buffer
        before, self._before = self._before, {}
        if buffer is None:
            return
        for name, weight in before.items():
            param = self.ctx.params[name]
            delta = torch.linalg.vector_norm(param.detach() - weight)
            # Undefined for a weight that was exactly zero (a zero-initialised bias, x = 0):
            # NaN here, and not written, rather than a 1e10 that flattens the chart.
            size = torch.linalg.vector_norm(weight)
            if is_dtensor(delta):  # sharded: the norms of the whole tensors, on every rank alike
                delta, size = delta.full_tensor(), size.full_tensor()
            ratio = torch.where(size > 0, delta / size, torch.full_like(size, float("nan")))
            buffer.add_scalar(tag("update_ratio", name), ratio)

    def on_close(self, failed: bool) -> None:
        self._before = {}

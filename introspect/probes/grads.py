"""``grads/{param}`` (and ``grad_norm/{param}``, derived when written): the gradients a logging
step's backward produced.

Without ``optimizer=`` each parameter's gradient is read when it is accumulated (the hook lives
for the logging step only; a later backward of the same step replaces the record). Under DDP the
gradient is read after DDP has averaged it (``on_after_reduction``). With ``optimizer=`` the
gradients are read just before ``optimizer.step()``, after any accumulation.
"""

from __future__ import annotations

import torch

from ..records.tags import tag
from ..runtime.amp import unscale
from .base import Probe, ProbeContext


class Grads(Probe):
    name = "grads"
    builtin = True
    wants_param_grads = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        # FSDP1's parameter views get their gradients without accumulation hooks: FlatShardGrads.
        flat = ctx.shards is not None and ctx.shards.flat_views
        self.wants_param_grads = ctx.config.optimizer is None and not flat
        self._reduced: dict[str, torch.Tensor] = {}  # read once DDP has averaged them

    def on_param_grad(self, name: str, param: torch.Tensor) -> None:
        buffer = self.ctx.buffer
        if buffer is None or param.grad is None:
            return
        if buffer.ddp_sync:  # DDP averages the gradient after this hook: read it once it has
            self._reduced[name] = param
            return
        buffer.set_histogram(tag("grads", name), unscale(param.grad, self.ctx.grad_scale()))

    def on_after_reduction(self) -> None:
        params, self._reduced = self._reduced, {}
        buffer = self.ctx.buffer
        if buffer is None or not params:
            return
        scale = self.ctx.grad_scale()
        for name, param in params.items():
            if param.grad is not None:
                buffer.set_histogram(tag("grads", name), unscale(param.grad, scale))

    def on_before_optimizer_step(self) -> None:
        buffer = self.ctx.buffer
        if self.wants_param_grads or buffer is None:
            return
        for name, param in self.ctx.params.items():
            if param.grad is not None:
                buffer.set_histogram(tag("grads", name), param.grad)

    def on_close(self, failed: bool) -> None:
        self._reduced = {}


class FlatShardGrads(Probe):
    """``grads/`` under FSDP1 with ``use_orig_params=True`` and without ``optimizer=``: FSDP sets
    each parameter view's gradient (this rank's piece) in its own end-of-backward callback, and no
    accumulation hook runs, so the gradients are read once that has run (``on_after_reduction``)."""

    name = "flat_shard_grads"
    builtin = True

    def on_after_reduction(self) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return
        for name, param in self.ctx.params.items():
            if param.grad is not None:
                buffer.set_histogram(tag("grads", name), param.grad)

"""``activation_grads/{module}``: gradients w.r.t. module outputs, from ``output.register_hook``
set on logging steps (not ``register_full_backward_hook``, which breaks on in-place ops)."""

from __future__ import annotations

import torch
from torch import nn

from ..records.tags import tag
from ..runtime.amp import unscale
from .base import Probe


class ActivationGrads(Probe):
    name = "activation_grads"
    builtin = True

    def on_output_grad(self, name: str, module: nn.Module, grad: torch.Tensor) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return None
        values = unscale(grad, self.ctx.grad_scale())
        # The check's sum is of this same tensor only when nothing was unscaled.
        buffer.add_histogram(tag("activation_grads", name), values, buffer.known_sum(grad) if values is grad else None)
        return None

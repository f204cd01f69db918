"""An exploding initialisation: at the first logging step, each weight layer's gain
``RMS(W) x sqrt(fan_in)``, the factor by which it scales the RMS of a random input.

Every common initialisation keeps it near 1 so that activations keep their scale through depth:
PyTorch's default for Linear/Conv (kaiming uniform, a=√5) gives 0.58, torchvision's kaiming normal
(fan_out) √(2 fan_in / fan_out) ≈ 1-1.4, Hugging Face's normal(0, 0.02) 0.02 √fan_in (0.2 for a
hidden size of 128, 1.3 for 4096, 3.4 for a 28,672-wide MLP); the largest of 14 torchvision and 7
Hugging Face models at init is 7.2 (EfficientNet-B0's squeeze-excitation ``fc1``, 96 -> 4 under
kaiming fan_out). A layer whose gain is above
``Thresholds.init_gain_max`` (10), with weights whose RMS is above ``init_rms_min`` (1.5: no common
init goes above 1.41, while a small head's own init may amplify more than ten, as EfficientNet's
uniform ±1/√classes does for a few classes), multiplies its input's scale by more than ten at once, every
layer after it sees values far from what it was made for, and its gradients follow: a weight
scaled x100 by mistake (or an init that ignores the fan-in) is named at once, before its
consequences. Measured once (the first logging step): one norm per weight, on the device, read
with that step's numbers.
"""

from __future__ import annotations

import math

import torch

from ..debugger.alerts import Alert
from ..debugger.origins import layer_of
from ..records.shards import local_view
from ..records.step import HostStep
from .base import Probe, ProbeContext, StepPlan

__all__ = ["InitScale", "fan_in"]

_WEIGHT_LAYERS = frozenset({"Linear", "LazyLinear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"})
"""Module types whose ``weight`` maps an input to an output (Conv1D: Hugging Face's GPT-2 layer)."""


def fan_in(module_type: str, shape: torch.Size) -> int:
    """Inputs per output unit: ``weight[0]`` is the output axis, except Hugging Face's Conv1D
    (``[in, out]``)."""
    if module_type == "Conv1D":
        return int(shape[0])
    return math.prod(shape[1:])


class InitScale(Probe):
    name = "init_scale"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._done = False
        self._fans: dict[str, float] = {}

    def active(self, plan: StepPlan) -> bool:
        return plan.logging and not self._done

    def on_step_start(self, plan: StepPlan) -> None:
        buffer = self.ctx.buffer
        if buffer is None or self._done:
            return
        self._done = True
        types = self.ctx.module_types
        with torch.no_grad():
            for name, param in self.ctx.params.items():
                layer = layer_of(name)
                module_type = types.get(layer, "")
                if not name.endswith(".weight") or module_type not in _WEIGHT_LAYERS or param.dim() < 2:
                    continue
                weight = local_view(param.detach())
                if weight.numel() == 0 or not weight.is_floating_point():
                    continue
                self._fans[layer] = float(fan_in(module_type, weight.shape))
                rms = torch.linalg.vector_norm(weight, dtype=torch.float32) / math.sqrt(weight.numel())
                buffer.add_measure(f"init_rms/{layer}", rms)

    def on_step_end(self, host: HostStep | None) -> None:
        if host is None or not self._fans:
            return
        fans, self._fans = self._fans, {}
        limits = self.ctx.config.thresholds
        limit = limits.init_gain_max
        for layer, fan in fans.items():
            rms = host.measures.get(f"init_rms/{layer}")
            if rms is None or not math.isfinite(rms) or rms <= limits.init_rms_min:
                continue
            gain = rms * math.sqrt(fan)
            if gain <= limit:
                continue
            self.ctx.findings.add(
                Alert(
                    "exploding_init",
                    layer,
                    host.step,
                    f"its weights (RMS {rms:.3g}) scale a random input's RMS by {gain:.3g} (RMS(W) x √fan_in, fan-in {fan:.0f}; "
                    f"common initialisations keep it near 1, the limit is {limit:.3g}): every layer after it "
                    "sees values far larger than it was made for",
                    {"gain": gain, "fan_in": fan, "weight_rms": rms},
                    module_type=self.ctx.module_types.get(layer, ""),
                )
            )

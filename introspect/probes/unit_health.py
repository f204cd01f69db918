"""Dead and saturated units: ReLU channels that output zero for every sample seen, sigmoid/tanh
outputs pinned at their bounds. Measured on logging steps (one reduction per output), judged
when the step's numbers reach the host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..debugger.health import check_activation_health
from ..records.step import HostStep
from .base import Probe, ProbeContext

__all__ = ["UnitHealth", "unit_health"]

# On logging steps only: one reduction over every dimension but the unit (channel) dimension 1.
UnitMeasure = Callable[[Any, str, torch.Tensor, Any, dict], None]


def _per_unit_max(values: torch.Tensor) -> torch.Tensor | None:
    if values.dim() < 2:
        return None
    dims = tuple(d for d in range(values.dim()) if d != 1)
    return values.amax(dim=dims)


def _active_samples(values: torch.Tensor) -> torch.Tensor | None:
    """Per unit (dimension 1): on how many samples (dimension 0) it output anything above 0."""
    if values.dim() < 2:
        return None
    per_sample = values.amax(dim=tuple(range(2, values.dim()))) if values.dim() > 2 else values
    return ((per_sample > 0) | per_sample.isnan()).sum(0)  # NaN is no verdict of death


def _measure_dead(buffer: Any, where: str, output: torch.Tensor, limits: Any, windows: dict) -> None:
    """Share of units (channels) that output zero for every sample of a window of logged batches,
    and share of units that died at once.

    One small batch says little (a unit active on 5% of inputs is zero on all 8 samples of a batch
    two times in three), so the per-unit "never active" mask is ANDed over consecutive logging
    steps until it has seen ``dead_min_samples`` samples; only then is the share measured. That
    window hides a layer that dies inside it (alive before, dead after: the AND is "alive"), so
    each unit's active rate over the earlier logging steps is kept too: a unit zero for every
    sample of this step, whose rate made that unlikely (``(1 - rate)^samples < dead_chance``), died
    now (``dead_sudden/{where}``, the share of all units that did). A legitimately sparse unit
    (active on a few samples in ten) is never "unlikely" to be silent on one batch.
    """
    active = _active_samples(output.detach())
    if active is None:
        return
    dead_now = active == 0
    samples = output.shape[0]
    rates = windows.get(("rate", where))
    if rates is not None and rates[0].shape == active.shape:
        total, seen = rates[0] + active, rates[1] + samples
        if rates[1] >= limits.dead_history_samples:
            chance = (1.0 - rates[0].float() / rates[1]).pow(samples)
            buffer.add_measure(f"dead_sudden/{where}", (dead_now & (chance < limits.dead_chance)).float().mean())
            buffer.add_measure(f"dead_now/{where}", dead_now.float().mean())
    else:
        total, seen = active, samples
    windows[("rate", where)] = (total, seen)
    previous = windows.get(where)
    if previous is not None and previous[0].shape == dead_now.shape:
        dead, seen = previous[0] & dead_now, previous[1] + output.shape[0]
    else:
        dead, seen = dead_now, output.shape[0]
    if seen >= limits.dead_min_samples:
        buffer.add_measure(f"dead/{where}", dead.float().mean())
        windows.pop(where, None)
    else:
        windows[where] = (dead, seen)


def _measure_saturation(distance_to_bound: Callable[[torch.Tensor], torch.Tensor]) -> UnitMeasure:
    def measure(buffer: Any, where: str, output: torch.Tensor, limits: Any, windows: dict) -> None:
        """Share of output values within ``saturation_margin`` of a bound, where the slope is ~0."""
        near = distance_to_bound(output.detach().float()) < limits.saturation_margin
        buffer.add_measure(f"saturated/{where}", near.float().mean())

    return measure


_UNIT_MEASURES: dict[str, UnitMeasure] = {
    "ReLU": _measure_dead,
    "ReLU6": _measure_dead,
    "Sigmoid": _measure_saturation(lambda y: torch.minimum(y, 1.0 - y)),
    "Tanh": _measure_saturation(lambda y: 1.0 - y.abs()),
}


def unit_health(module_type: str) -> UnitMeasure | None:
    """The dead/saturated-unit measure for an activation module's type name, if it has one."""
    return _UNIT_MEASURES.get(module_type)


class UnitHealth(Probe):
    name = "unit_health"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._measures = {n: m for n, t in ctx.module_types.items() if (m := unit_health(t)) is not None}
        self._windows: dict[str, Any] = {}  # per-unit masks carried across logging steps

    def select(self, name: str, module: nn.Module) -> bool:
        return name in self._measures

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        measure = self._measures[name]
        for where, _, tensor in self.ctx.outputs(name, output):
            measure(self.ctx.buffer, where, tensor, self.ctx.config.thresholds, self._windows)
        return None

    def on_step_end(self, host: HostStep | None) -> None:
        if host is None:
            return
        ctx = self.ctx
        for alert in check_activation_health(host.step, host.measures, ctx.module_types, ctx.config.thresholds):
            ctx.findings.add(alert)

    def on_close(self, failed: bool) -> None:
        self._windows = {}

"""Dead and saturated units: ReLU channels that output zero for every sample seen, sigmoid/tanh
outputs pinned at their bounds. Measured on logging steps, judged when the step's numbers reach
the host.

The outputs are measured together at the end of the forward, not one by one in their hooks: the
outputs of one kind and shape (the ReLUs of a stack of blocks) are stacked and reduced at once, so
a logging step costs a constant number of ops however many such modules the model has. Until
then they are held by reference: each is saved for the backward by its own module anyway (ReLU,
sigmoid and tanh save their output), which is also why nothing can change them in place before
(autograd would refuse the backward). Outputs above ``PACK_LIMIT`` values are measured at once,
alone: their bytes, not the op count, are the cost, and a stack of them would copy them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..debugger.health import check_activation_health
from ..records.step import HostStep
from .base import Probe, ProbeContext

__all__ = ["UnitHealth", "unit_health", "PACK_LIMIT"]

PACK_LIMIT = 1 << 16
"""Outputs of at most this many values are stacked with the others of their kind and shape."""

_KINDS = {"ReLU": "dead", "ReLU6": "dead", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def unit_health(module_type: str) -> str | None:
    """The unit measure of an activation module's type name: "dead" (ReLU), "sigmoid" or "tanh"
    (saturation), or None."""
    return _KINDS.get(module_type)


def _distance_to_bound(kind: str, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(y, 1.0 - y) if kind == "sigmoid" else 1.0 - y.abs()


class UnitHealth(Probe):
    name = "unit_health"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._kinds = {n: k for n, t in ctx.module_types.items() if (k := unit_health(t)) is not None}
        # Per group of outputs (names, shape): the per-unit "never active" masks ANDed over
        # consecutive logging steps, and how many samples each has seen.
        self._windows: dict[tuple, tuple[torch.Tensor, list[int]]] = {}
        self._held: list[tuple[str, str, torch.Tensor]] = []
        self._rates: dict[tuple, tuple[torch.Tensor, int]] = {}  # per group: samples each unit was on, of how many

    def select(self, name: str, module: nn.Module) -> bool:
        return name in self._kinds

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        kind = self._kinds[name]
        for where, _, tensor in self.ctx.outputs(name, output):
            if kind == "dead" and tensor.dim() < 2:
                continue  # no unit dimension
            if tensor.numel() > PACK_LIMIT:
                self._measure(kind, [(where, tensor.detach())])
            else:
                self._held.append((where, kind, tensor.detach()))
        return None

    def on_forward_end(self, output: Any) -> None:
        held, self._held = self._held, []
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for where, kind, tensor in held:
            groups.setdefault((kind, tensor.shape, tensor.dtype, tensor.device), []).append((where, tensor))
        for (kind, *_), members in groups.items():
            self._measure(kind, members)

    def _measure(self, kind: str, members: list[tuple[str, torch.Tensor]]) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return
        limits = self.ctx.config.thresholds
        tensors = [t for _, t in members]
        x = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)  # (k, batch, unit, ...)
        if kind != "dead":
            # Share of output values within ``saturation_margin`` of a bound, where the slope is ~0.
            near = (_distance_to_bound(kind, x.float()) < limits.saturation_margin).flatten(1)
            shares = near.float().mean(dim=1)
            for i, (where, _) in enumerate(members):
                buffer.add_measure(f"saturated/{where}", shares[i])
            return
        # Share of units (channels) that output zero for every sample of a window of logged
        # batches. One small batch says little (a unit active on 5% of inputs is zero on all 8
        # samples of a batch two times in three), so the per-unit "never active" mask is ANDed
        # over consecutive logging steps until it has seen ``dead_min_samples`` samples.
        dead_now = x.amax(dim=tuple(d for d in range(x.dim()) if d not in (0, 2))) <= 0  # (k, unit)
        key = (tuple(w for w, _ in members), tuple(x.shape[2:3]))
        self._sudden(key, members, x, dead_now)
        window = self._windows.get(key)
        batch = x.shape[1]
        if window is None:
            dead, seen = dead_now, [batch] * len(members)
        else:
            previous, counts = window
            fresh = [c == 0 for c in counts]
            if any(fresh):  # a window that just ended starts again from this batch
                previous = previous | torch.tensor(fresh, device=previous.device).unsqueeze(1)
            dead, seen = previous & dead_now, [c + batch for c in counts]
        ready = [s >= limits.dead_min_samples for s in seen]
        if any(ready):
            shares = dead.float().mean(dim=1)
            for i, (where, _) in enumerate(members):
                if ready[i]:
                    buffer.add_measure(f"dead/{where}", shares[i])
                    seen[i] = 0
        self._windows[key] = (dead, seen)

    def _sudden(
        self, key: tuple, members: list[tuple[str, torch.Tensor]], x: torch.Tensor, dead_now: torch.Tensor
    ) -> None:
        """Units that died at once. The window above hides a layer that dies inside it (alive
        before, dead after: the AND says "alive"), so each unit's active rate over the earlier
        logging steps is kept too: a unit zero for every sample of this step, whose rate made that
        unlikely (``(1 - rate)^samples < dead_chance``), died now (``dead_sudden/{where}``, the share
        of all units that did). A legitimately sparse unit (active on a few samples in ten) is never
        "unlikely" to be silent on one batch. NaN is no verdict of death."""
        buffer, limits = self.ctx.buffer, self.ctx.config.thresholds
        if buffer is None:
            return
        per_sample = x.amax(dim=tuple(range(3, x.dim()))) if x.dim() > 3 else x  # (k, batch, unit)
        active = ((per_sample > 0) | per_sample.isnan()).sum(1)  # (k, unit): samples each unit was on
        batch = x.shape[1]
        rates = self._rates.get(key)
        if rates is not None and rates[0].shape == active.shape:
            total, seen = rates[0] + active, rates[1] + batch
            if rates[1] >= limits.dead_history_samples:
                chance = (1.0 - rates[0].float() / rates[1]).pow(batch)
                sudden = (dead_now & (chance < limits.dead_chance)).float().mean(dim=1)
                now = dead_now.float().mean(dim=1)
                for i, (where, _) in enumerate(members):
                    buffer.add_measure(f"dead_sudden/{where}", sudden[i])
                    buffer.add_measure(f"dead_now/{where}", now[i])
        else:
            total, seen = active, batch
        self._rates[key] = (total, seen)

    def on_step_end(self, host: HostStep | None) -> None:
        self._held = []  # a forward that never reached its end
        if host is None:
            return
        ctx = self.ctx
        for alert in check_activation_health(host.step, host.measures, ctx.module_types, ctx.config.thresholds):
            ctx.findings.add(alert)

    def on_close(self, failed: bool) -> None:
        self._windows = {}
        self._rates = {}
        self._held = []

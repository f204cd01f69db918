"""Dead and saturated units: ReLU channels that output zero for every sample seen, GELU/SiLU units
that output ~0 (``|y| < dead_smooth_zero``) for every sample, sigmoid/tanh outputs pinned at their
bounds. Measured on logging steps, judged when the step's numbers reach
the host.

The outputs are measured together at the end of the forward, not one by one in their hooks: the
outputs of one kind and shape (the ReLUs of a stack of blocks) are stacked and reduced at once, so
a logging step costs a constant number of ops however many such modules the model has. Until
then they are held by reference: each is saved for the backward by its own module anyway (ReLU,
sigmoid and tanh save their output), which is also why nothing can change them in place before
(autograd would refuse the backward; GELU and SiLU save their input instead, so their outputs are
held until the forward's end on logging steps only). Outputs above ``PACK_LIMIT`` values are measured at once,
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
# GELU/SiLU units: "off" on a sample when |y| < dead_smooth_zero (a unit pushed far below zero).
# Hugging Face's MLPs hold their activation as a module of ACT2FN (activations.py); these are
# the GELU and SiLU ones (GPT-2's gelu_new is NewGELUActivation, Llama's silu is SiLUActivation
# or nn.SiLU).
_SMOOTH = (
    "GELU",
    "SiLU",
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "AccurateGELUActivation",
    "SiLUActivation",
)
_KINDS.update(dict.fromkeys(_SMOOTH, "smooth"))


def unit_health(module_type: str) -> str | None:
    """The unit measure of an activation module's type name: "dead" (ReLU), "smooth" (GELU/SiLU:
    dead when ~0), "sigmoid" or "tanh" (saturation), or None."""
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
        self._held: list[tuple[str, str, torch.Tensor, int]] = []
        self._calls: dict[str, int] = {}  # this step's calls of each module so far
        self._rates: dict[tuple, tuple[torch.Tensor, int]] = {}  # per group: samples each unit was on, of how many

    def select(self, name: str, module: nn.Module) -> bool:
        return name in self._kinds

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        kind = self._kinds[name]
        # A module called more than once a forward (torchvision's BasicBlock calls one ReLU after
        # bn1 and after the sum) is measured per call: each call keeps its own history, and the
        # module's number is its worst call's (a layer dead on one call is a dead layer).
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        for where, _, tensor in self.ctx.outputs(name, output):
            if kind in ("dead", "smooth") and tensor.dim() < 2:
                continue  # no unit dimension
            if tensor.numel() > PACK_LIMIT:
                self._measure(kind, [(where, tensor.detach())], (call,))
            else:
                self._held.append((where, kind, tensor.detach(), call))
        return None

    def on_forward_end(self, output: Any) -> None:
        held, self._held = self._held, []
        self._calls = {}
        groups: dict[tuple, list[tuple[str, torch.Tensor, int]]] = {}
        for where, kind, tensor, call in held:
            groups.setdefault((kind, tensor.shape, tensor.dtype, tensor.device), []).append((where, tensor, call))
        for (kind, *_), members in groups.items():
            self._measure(kind, [(w, t) for w, t, _ in members], tuple(c for *_, c in members))

    def _put(self, key: str, value: torch.Tensor) -> None:
        """A measure of this step; a second call of the module keeps the larger share (worst call)."""
        buffer = self.ctx.buffer
        assert buffer is not None
        old = buffer.measure(key)
        buffer.add_measure(key, value if old is None else torch.maximum(old, value.reshape(())))

    def _put_all(self, kind: str, members: list[tuple[str, torch.Tensor]], values: torch.Tensor) -> None:
        """``{kind}/{where}`` of every member at once (``values[i]`` is member ``i``'s): one tensor
        for the group, not one per module; a module already measured this step, or twice in the
        group (a second call), goes through ``_put``, keeping its worst call."""
        buffer = self.ctx.buffer
        assert buffer is not None
        keys = tuple(f"{kind}/{where}" for where, _ in members)
        # A module twice in the group (one ReLU module called twice a step, as in a ResNet block)
        # or measured before this step: one at a time, each key keeping its worst call.
        if len(set(keys)) < len(keys) or any(buffer.measure(key) is not None for key in keys):
            for key, value in zip(keys, values.unbind(0)):
                self._put(key, value)
            return
        buffer.add_measures(keys, values)

    def _measure(self, kind: str, members: list[tuple[str, torch.Tensor]], calls: tuple[int, ...] = ()) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return
        limits = self.ctx.config.thresholds
        tensors = [t for _, t in members]
        x = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)  # (k, batch, unit, ...)
        if kind == "smooth":
            # A GELU/SiLU unit is on where |y| is above dead_smooth_zero: then the ReLU rule applies.
            # A token stream (batch, tokens, hidden) has its units last (a transformer's MLP).
            x = x.abs() - limits.dead_smooth_zero
            # Each token is a sample of the unit: (k, batch x tokens, hidden).
            if x.dim() == 4:
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            kind = "dead"
        if kind != "dead":
            # Share of output values within ``saturation_margin`` of a bound, where the slope is ~0.
            near = (_distance_to_bound(kind, x.float()) < limits.saturation_margin).flatten(1)
            self._put_all("saturated", members, near.float().mean(dim=1))
            return
        # Share of units (channels) that output zero for every sample of a window of logged
        # batches. One small batch says little (a unit active on 5% of inputs is zero on all 8
        # samples of a batch two times in three), so the per-unit "never active" mask is ANDed
        # over consecutive logging steps until it has seen ``dead_min_samples`` samples.
        dead_now = x.amax(dim=tuple(d for d in range(x.dim()) if d not in (0, 2))) <= 0  # (k, unit)
        key = (tuple(w for w, _ in members), calls, tuple(x.shape[2:3]))
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
            if all(ready):
                self._put_all("dead", members, shares)
                seen = [0] * len(seen)
            else:
                for i, (where, _) in enumerate(members):
                    if ready[i]:
                        self._put(f"dead/{where}", shares[i])
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
                self._put_all("dead_sudden", members, sudden)
                self._put_all("dead_now", members, dead_now.float().mean(dim=1))
        else:
            total, seen = active, batch
        self._rates[key] = (total, seen)

    def on_step_end(self, host: HostStep | None) -> None:
        self._held = []  # a forward that never reached its end
        self._calls = {}
        if host is None:
            return
        ctx = self.ctx
        for alert in check_activation_health(host.step, host.measures, ctx.module_types, ctx.config.thresholds):
            ctx.findings.add(alert)

    def on_close(self, failed: bool) -> None:
        self._windows = {}
        self._rates = {}
        self._held = []
        self._calls = {}

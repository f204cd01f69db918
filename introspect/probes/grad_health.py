"""Vanishing, exploding and stuck layers from each logging step's gradient records, and the
gradient-flow figure (``diagnostics/grad_flow``) when a new gradient finding appears and at the end.

A figure costs ~0.2–0.7 s of the training thread, and a sick model brings news often (a deep ReLU
stack dying layer by layer: 7 new findings in 200 steps, ~10 ms per step on average). So news is
drawn within the live figures' budget (``ProbeContext.figures``, shared with the health map): the
first figure at once, later news at the first logging step where it fits, and always at close."""

from __future__ import annotations

import math
import time

from ..debugger.baselines import Baselines, judge_module_shifts
from ..debugger.health import GradientHealth
from ..debugger.origins import nonfinite_gradients
from ..records.budget import block_of
from ..records.step import HostStep
from ..records.tags import GRAD_FLOW_TAG, tag_name
from ..records.visuals import grad_flow_image
from .base import Probe, ProbeContext

__all__ = ["GradHealth"]

_FIRST_FIGURE_S = 0.3
"""The figure's cost before one was measured (0.2–0.7 s on a 2-core CPU, 10–100 bars)."""


class GradHealth(Probe):
    name = "grad_health"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._health = GradientHealth(ctx.config.thresholds)
        self._baselines = Baselines.of(ctx.config.thresholds)  # each layer against its own past
        self._last: tuple[int, dict[str, tuple[float, float, float]]] | None = None
        self._drawn: int | None = None
        self._news = False  # a new gradient finding not drawn yet
        self._drawing_s = _FIRST_FIGURE_S  # the last figure's cost

    def on_step_end(self, host: HostStep | None) -> None:
        buffer = self.ctx.buffer
        if host is None or (buffer is not None and buffer.grads_overflowed):  # the scaler skips the step
            return
        layers: dict[str, list[float]] = {}
        for name, record in host.of_kind("grads").items():
            layer = name.rpartition(".")[0] or name
            entry = layers.setdefault(layer, [0.0, 0.0, 0.0])
            entry[0] += record.sum_squares
            entry[1] += record.finite_count
            entry[2] = max(entry[2], abs(record.min), abs(record.max))
        if not layers:
            return
        ratios = {tag_name(t)[1]: v for t, v in host.scalars.items() if tag_name(t)[0] == "update_ratio"}
        sums = {layer: (v[0], v[1]) for layer, v in layers.items()}
        nonfinite = nonfinite_gradients(host.histograms)
        alerts = self._health.check(host.step, sums, ratios, nonfinite=nonfinite)
        alerts += self._shifts(host, sums, ratios, nonfinite)
        self._last = (host.step, {k: (v[0], v[1], v[2]) for k, v in layers.items()})
        # A new gradient finding gets the figure (when the budget allows); one that persists
        # does not redraw it.
        if [a for a in alerts if self.ctx.findings.add(a)]:
            self._news = True
        if self._news and self.ctx.figures.fits(self._drawing_s):
            self._draw()

    def _shifts(
        self,
        host: HostStep,
        sums: dict[str, tuple[float, float]],
        ratios: dict[str, float],
        nonfinite: dict[str, float],
    ) -> list:
        """Gradient RMS, activation RMS and update ratios against each one's own past; what holds
        NaN/Inf is not measured (its finite rest says nothing)."""
        grad_rms = {
            layer: math.sqrt(sq / n) for layer, (sq, n) in sums.items() if n > 0 and nonfinite.get(layer, 0) == 0
        }
        activation_rms = {}
        for name, record in host.of_kind("activations").items():
            if record.finite_count > 0 and record.nonfinite == 0:
                activation_rms[name] = math.sqrt(max(record.sum_squares, 0.0) / record.finite_count)
        floor = self.ctx.config.thresholds.update_ratio_floor
        factor = self.ctx.config.thresholds.update_ratio_factor
        return judge_module_shifts(self._baselines, host.step, grad_rms, activation_rms, ratios, floor, factor)

    def on_close(self, failed: bool) -> None:
        self._draw()

    def _draw(self) -> None:
        """The gradient-flow figure (a figure costs ~0.2 s, so only on news and at the end)."""
        writer = self.ctx.writer
        if not writer or self._last is None or not hasattr(writer.writer, "add_image"):
            return
        step, layers = self._last
        if self._drawn == step:
            return

        def finite(v: float) -> float:
            return v if math.isfinite(v) else 0.0

        budget = self.ctx.budget
        if budget is not None and budget.active:  # a large model: one bar per block, not per layer
            layers = _per_block(layers, budget.blocks)
        names = list(layers)
        rms = [finite(math.sqrt(v[0] / v[1])) if v[1] and v[0] >= 0 else 0.0 for v in layers.values()]
        max_abs = [finite(v[2]) for v in layers.values()]
        began = time.perf_counter()
        try:
            image = grad_flow_image(names, rms, max_abs, step)
        except Exception as e:
            self.ctx.disable("<grad_flow>", None, e)
            return
        finally:
            self._drawing_s = time.perf_counter() - began
            self.ctx.figures.charge(self._drawing_s)
        self._news = False
        if writer.call("add_image", GRAD_FLOW_TAG, image, step, dataformats="HWC"):
            self._drawn = step


def _per_block(
    layers: dict[str, tuple[float, float, float]], blocks: dict[str, str]
) -> dict[str, tuple[float, float, float]]:
    """The gradient records of layers pooled per roll-up block (records/budget.py), in order:
    a figure of 800 bars took 24 s to draw and showed nothing one could read."""
    out: dict[str, tuple[float, float, float]] = {}
    for layer, (squares, count, top) in layers.items():
        block = block_of(layer, blocks)
        s, c, t = out.get(block, (0.0, 0.0, 0.0))
        out[block] = (s + squares, c + count, max(t, top))
    return out

"""The health map (on by default, ``log`` holds ``"health_map"``): every watched module over every
logging step, one picture per statistic (``diagnostics/health_map/{stat}``), at image steps
(``image_every``) and at close.

What it costs, measured (2-core shared CPU VM, interleaved against the same watch without it,
default cadence; numbers in docs/benchmarks.md): feeding the map is a pass over a logging step's
records on the host, well under 1% of a step; the pictures are what cost, ~0.1 s each on a small
CNN and ~0.9 s on a 200-row map. So the live pictures are drawn at an image step only while
drawing has taken at most ``RENDER_SHARE`` of the time since the watch began (the first one
waits until its estimated cost fits too; the budget, ``ProbeContext.figures``, is shared with
the gradient-flow figure), and always at close, whatever the share: the map of
a whole run is its last picture. The same map can be drawn afterwards from any run's event
files with ``introspect map RUNDIR``.

On a model above ``max_modules`` (records/budget.py), per-module histograms are written for a
budget of modules only; so that ``introspect map`` still shows every module, each logging step's
numbers of every module are written as one text, ``diagnostics/health_data``. The live pictures
draw at most ``max_modules`` rows (every module with a finding, the others evenly spaced; a
picture's cost grows with its rows); ``introspect map`` draws up to ``MAX_ROWS``.
"""

from __future__ import annotations

import time

from ..analysis.health_map_render import MAX_ROWS, HealthMap, host_values
from ..records.budget import health_data_text
from ..records.step import HostStep
from ..records.tags import HEALTH_DATA_TAG
from .base import Probe, ProbeContext, StepPlan
from .time_share import RENDER_SHARE

__all__ = ["HealthMapProbe", "RENDER_SHARE"]

_FIRST_PICTURE_S = 0.1
_PER_ROW_S = 0.005
"""The first picture's cost estimate: ~0.1 s plus ~5 ms per drawn row (measured: 0.1 s for 10
rows, 0.9 s for 200)."""


class HealthMapProbe(Probe):
    name = "health_map"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        rows = min(ctx.budget.max_modules or MAX_ROWS, MAX_ROWS) if ctx.budget is not None else MAX_ROWS
        self.map = HealthMap(max_rows=rows) if callable(getattr(ctx.writer.writer, "add_image", None)) else None
        self._last_drawing_s: float | None = None

    def active(self, plan: StepPlan) -> bool:
        return plan.logging or plan.checking  # a checked step the replay went over has a column too

    def on_step_end(self, host: HostStep | None) -> None:
        if self.map is None:
            return
        buffer = self.ctx.buffer
        if host is None:
            counts = buffer.nonfinite_counts if buffer is not None else None
            if counts:  # the replayed NaN step: its per-module counts, off the cadence
                self.map.add_values(buffer.step, {"nonfinite": counts})  # type: ignore[union-attr]
                self.map.add_findings(self.ctx.findings.alerts)
            return
        values, order = host_values(host)
        self.map.add_values(host.step, values, order)
        self.map.add_findings(self.ctx.findings.alerts)
        budget = self.ctx.budget
        if budget is not None and budget.active and order:
            self.ctx.writer.call("add_text", HEALTH_DATA_TAG, health_data_text(values, order), host.step)
        if host.step % self.ctx.config.image_every == 0 and len(self.map.steps) > 1 and self._drawing_fits():
            self._write(host.step)

    def _drawing_fits(self) -> bool:
        """Whether drawing now keeps the live figures within ``RENDER_SHARE`` of the run's time."""
        if self.map is None:
            return False
        estimate = self._last_drawing_s
        if estimate is None:
            pictures = len(self.map.available())
            estimate = pictures * (_FIRST_PICTURE_S + _PER_ROW_S * len(self.map.drawn_rows()))
        return self.ctx.figures.fits(estimate, first_at_once=False)

    def on_close(self, failed: bool) -> None:
        if self.map is None or not self.map.steps:
            return
        self.map.add_findings(self.ctx.findings.alerts)
        self._write(self.ctx.clock.step)

    def _write(self, step: int) -> None:
        if self.map is None:
            return
        began = time.perf_counter()
        try:
            # drawn here, written by the writer thread: the map goes on changing after this step
            self.map.write(self.ctx.writer.deferred(), step)
        except Exception as e:
            self.ctx.disable("<health_map>", None, e)
        self._last_drawing_s = time.perf_counter() - began
        self.ctx.figures.charge(self._last_drawing_s)

"""``log=[..., "health_map"]``: every watched module over every logging step, one picture per
statistic (``diagnostics/health_map/{stat}``), at image steps (``image_every``) and at close.

Opt-in: five pictures cost about 1-1.5 s of matplotlib on a 2-core CPU, which is nothing for a
long run's end but more than a default should add to a short one. The same map can be drawn
afterwards from any run's event files with ``introspect map RUNDIR``.
"""

from __future__ import annotations

from ..analysis.health_map_render import HealthMap
from ..records.step import HostStep
from .base import Probe, ProbeContext, StepPlan

__all__ = ["HealthMapProbe"]


class HealthMapProbe(Probe):
    name = "health_map"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self.map = HealthMap() if callable(getattr(ctx.writer.writer, "add_image", None)) else None

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
        self.map.add(host.step, host, self.ctx.findings.alerts)
        if host.step % self.ctx.config.image_every == 0 and len(self.map.steps) > 1:
            self._write(host.step)

    def on_close(self, failed: bool) -> None:
        if self.map is None or not self.map.steps:
            return
        self.map.add_findings(self.ctx.findings.alerts)
        self._write(self.ctx.clock.step)

    def _write(self, step: int) -> None:
        if self.map is None:
            return
        try:
            self.ctx.writer.run(self.map.write, step)
        except Exception as e:  # pragma: no cover - run() reports writer failures itself
            self.ctx.disable("<health_map>", None, e)

"""``hparams=``: the run's hyperparameters for TensorBoard's HPARAMS dashboard, the final metrics
from ``w.finish(metrics=...)``, and a failed session's end when the watch closes on an error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import IntrospectError
from ..records.run_params import RunHparams, check_metrics
from .base import Probe, ProbeContext

__all__ = ["Hparams"]


class Hparams(Probe):
    name = "hparams"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        hparams = ctx.config.hparams
        self.run = RunHparams(hparams) if hparams is not None else None
        self._metrics: dict[str, float] | None = None
        if self.run is not None:
            self._write(self.run.start)

    def set_final_metrics(self, metrics: Mapping[str, Any] | None) -> None:
        values = check_metrics(metrics)
        self.run = self.run or RunHparams({})
        if self.run.ended:
            raise IntrospectError(
                "this run's HPARAMS session has ended already (finish() was called, or the watch "
                "closed on an error); metrics are recorded once"
            )
        self._metrics = values

    def on_close(self, failed: bool) -> None:
        if self.run is None:
            return
        step = self.ctx.clock.step
        if self._metrics is not None:
            self._write(self.run.finish, self._metrics, step)
        elif failed:
            self._write(self.run.end, True, step)

    def _write(self, write: Callable[..., None], *args: Any) -> None:
        raw = self.ctx.writer.writer
        if raw is None or "<hparams>" in self.ctx.disabled:
            return
        try:
            write(raw, *args)
        except Exception as e:  # hyperparameters are never worth a crashed run
            self.ctx.disable("<hparams>", None, e)

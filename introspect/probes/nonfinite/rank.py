"""Which rank a NaN came from, under DDP (see :mod:`introspect.runtime.distributed` for why the exchange
runs only when DDP's averaged gradients hold NaN/Inf, once per run, and cannot hang)."""

from __future__ import annotations

import math

from ...debugger.alerts import Alert
from ...records.step import Check, StepBuffer
from ...runtime.distributed import (
    new_session,
    origin_code,
    origin_ranks,
    rank_origin_alert,
    reduced_gradient_sum,
)
from ..base import ProbeContext

__all__ = ["RankOrigin"]

_LABEL = Check("reduced_grads")


class RankOrigin:
    """A service of the non-finite check: the once-per-run exchange naming a NaN's rank."""

    def __init__(self, ctx: ProbeContext) -> None:
        self._ctx = ctx
        self._session = new_session()  # names this watcher's keys in the process group's store
        self._done = False

    def add_reduced_check(self, buffer: StepBuffer) -> bool:
        """Sum the averaged gradients into the check's one transfer; False once the exchange ran."""
        if self._done:
            return False
        total = reduced_gradient_sum(list(self._ctx.params.values()))
        if total is None:
            return False
        buffer.add_check(_LABEL, total)
        return True

    @property
    def done(self) -> bool:
        """The exchange ran (it runs once per run)."""
        return self._done

    def exchange(self, buffer: StepBuffer, local: Alert | None) -> Alert | None:
        """When the averaged gradients are not finite (on every rank at once): the rank finding."""
        buffer.sync_checks()  # a no-op unless the check returned before its transfer
        reduced = [v for label, v in zip(buffer.check_labels, buffer.check_values) if label.kind == _LABEL.kind]
        if not reduced or math.isfinite(reduced[-1]):
            return None
        return self.exchange_reduced(buffer.step, local)

    def exchange_reduced(self, step: int, local: Alert | None) -> Alert:
        """The rank finding, on a step whose averaged gradients every rank saw non-finite."""
        self._done = True
        names = list(self._ctx.modules)
        codes = origin_ranks(origin_code(local, names), self._session, step)
        return rank_origin_alert(step, codes, names)

"""Which rank a NaN came from, under DDP and FSDP2 (see :mod:`introspect.runtime.distributed` for why
the exchange runs only when the reduced gradients hold NaN/Inf, once per run, and cannot hang).

Under DDP every rank reads the same averaged gradients, so every rank joins the exchange at the
same step. Under FSDP2 each rank reads its own shard of the reduce-scattered gradients: a NaN made
on one rank reaches every rank's shard whenever it spreads over the gradient (a NaN loss, a NaN
activation feeding a Linear), and then every rank joins at that step; a rank that found an origin
of its own joins too, and a rank whose shard stayed finite is reported silent after
``RANK_WAIT_S`` (once per run)."""

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

    def exchange(self, buffer: StepBuffer, local: Alert | None, sharded: bool = False) -> Alert | None:
        """When the averaged gradients are not finite (on every rank at once; ``sharded``: this
        rank's shard of them, or this rank found an origin itself): the rank finding."""
        buffer.sync_checks()  # a no-op unless the check returned before its transfer
        reduced = [v for label, v in zip(buffer.check_labels, buffer.check_values) if label.kind == _LABEL.kind]
        fired = bool(reduced) and not math.isfinite(reduced[-1])
        if not fired and not (sharded and reduced and local is not None):
            return None
        return self.exchange_reduced(buffer.step, local, "FSDP's reduce-scatter" if sharded else "DDP's all-reduce")

    def exchange_reduced(self, step: int, local: Alert | None, carrier: str = "DDP's all-reduce") -> Alert:
        """The rank finding, on a step whose averaged gradients every rank saw non-finite."""
        self._done = True
        names = list(self._ctx.modules)
        codes = origin_ranks(origin_code(local, names), self._session, step)
        return rank_origin_alert(step, codes, names, carrier)

"""``rank_divergence``: a rank whose activations stand apart from the other ranks' (silent data
corruption, a bad device, one rank's broken input), under DDP or sharded training with 3 or more
ranks (with two, nothing can say which one is wrong).

On logging steps (the same steps on every rank, see ``StepClock(shared=True)``), each rank sums
up, per watched module, the largest |activation|, the activations' L2 norm and their NaN/Inf
count; one ``all_gather`` on the watcher's own group (``distributed.SideGroup``, its wait bounded)
brings every rank's vector to every rank. A value whose robust z-score over the ranks (median
and MAD, of the log of the value, the MAD floored so that ranks that agree closely are not
flagged for a small difference) exceeds ``Z_LIMIT`` is a finding naming the rank and the module;
so is a NaN/Inf count where the ranks' median is 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..debugger.alerts import Alert
from ..errors import IntrospectWarning, warn
from ..records.shards import local_view
from ..records.step import HostStep
from ..runtime.distributed import rank_and_world
from .base import Probe, ProbeContext, StepPlan

__all__ = ["RankDivergence", "divergent_ranks", "Z_LIMIT", "MIN_RANKS"]

Z_LIMIT = 6.0
"""How many robust standard deviations (of the log value) make a rank stand apart."""

LOG_MAD_FLOOR = 0.15
"""The smallest spread assumed among the ranks, in log units: with ``Z_LIMIT`` a rank needs to be
about 4x off the median before it is named (healthy ranks' batches differ by far less)."""

MIN_RANKS = 3

_MEASURES = ("max_abs", "l2_norm", "nonfinite")


def divergent_ranks(values: torch.Tensor) -> list[tuple[int, int, str, float]]:
    """``[(rank, module index, measure, z)]`` from ``(world, modules, 3)`` values (NaN: that rank
    had no such output this step), the largest deviations first, one per module."""
    found: list[tuple[int, int, str, float]] = []
    world, n, _ = values.shape
    for m in range(n):
        best: tuple[int, int, str, float] | None = None
        for k, measure in enumerate(_MEASURES[:2]):
            column = values[:, m, k]
            seen = ~torch.isnan(column)
            if int(seen.sum()) < MIN_RANKS:
                continue
            logs = torch.log(column.clamp_min(1e-30))
            finite = seen & torch.isfinite(logs)
            median = logs[finite].median()
            mad = (logs[finite] - median).abs().median().clamp_min(LOG_MAD_FLOOR)
            z = (0.6745 * (logs - median) / mad).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
            z = torch.where(seen, z, torch.zeros_like(z))
            rank = int(z.abs().argmax())
            score = float(z[rank].abs())
            if score > Z_LIMIT and (best is None or score > abs(best[3])):
                best = (rank, m, measure, float(z[rank]))
        counts = values[:, m, 2]
        seen = ~torch.isnan(counts)
        if best is None and int(seen.sum()) >= MIN_RANKS and float(counts[seen].median()) == 0.0:
            worst = int(torch.where(seen, counts, torch.zeros_like(counts)).argmax())
            if float(counts[worst]) > 0:
                best = (worst, m, "nonfinite", math.inf)
        if best is not None:
            found.append(best)
    return found


class RankDivergence(Probe):
    name = "rank_divergence"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._names = list(ctx.modules)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._step: dict[int, list[torch.Tensor]] = {}
        self._warned = False

    def on_step_start(self, plan: StepPlan) -> None:
        self._step = {}

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        tensors = [local_view(t).detach() for _, _, t in self.ctx.outputs(name, output)]
        if not tensors:
            return None
        flat = [t.reshape(-1).float() for t in tensors if t.numel()]
        if not flat:
            return None
        x = torch.cat(flat) if len(flat) > 1 else flat[0]
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, torch.zeros_like(x))
        row = torch.stack([clean.abs().amax(), torch.linalg.vector_norm(clean), (~finite).sum().float()])
        previous = self._step.get(self._index[name])
        if previous is None:  # several calls in one step: the largest of each
            self._step[self._index[name]] = [row]
        else:
            previous.append(row)
        return None

    def on_step_end(self, host: HostStep | None) -> None:
        if host is None or self.ctx.side_group.broken or self._warned:
            return
        try:
            self._compare(host)
        except Exception as e:  # never the training's end: one warning, and the check stops
            self._stop(e)

    def _stop(self, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            warn(
                f"introspect: rank_divergence stopped: {type(error).__name__}: {error} (does every rank call watch()?)",
                IntrospectWarning,
            )

    def _compare(self, host: HostStep) -> None:
        local = torch.full((len(self._names), 3), math.nan, dtype=torch.float64)
        for index, rows in self._step.items():
            local[index] = torch.stack(rows).amax(dim=0).cpu().to(torch.float64)
        self._step = {}
        values = self.ctx.side_group.all_gather(local)  # bounded: a rank that never comes raises
        world = values.shape[0]
        for rank, m, measure, z in divergent_ranks(values):
            name = self._names[m]
            value = float(values[rank, m, _MEASURES.index(measure)])
            others = values[:, m, _MEASURES.index(measure)]
            median = float(others[~torch.isnan(others)].median())
            what = {"max_abs": "largest |activation|", "l2_norm": "activation L2 norm", "nonfinite": "NaN/Inf count"}[
                measure
            ]
            self.ctx.findings.add(
                Alert(
                    "rank_divergence",
                    name,
                    host.step,
                    f"rank {rank} stands apart from the other {world - 1} ranks at {name}: its {what} is "
                    f"{value:.4g} where the ranks' median is {median:.4g} (robust z {z:+.1f}); a bad "
                    "device, silent data corruption or that rank's own data",
                    {"rank": float(rank), "z": z, "value": value, "median": median, "ranks": float(world)},
                    phase="forward",
                    module_type=self.ctx.module_types.get(name, ""),
                )
            )


def divergence_wanted(ctx: ProbeContext) -> bool:
    """Whether the run has enough ranks under DDP or sharding for the check to say anything."""
    return rank_and_world()[1] >= MIN_RANKS and (ctx.ddp is not None or ctx.shards is not None)

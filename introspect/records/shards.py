"""Watching sharded training (FSDP2's ``fully_shard``, ``DTensor`` parameters): exact statistics
of weights and gradients across shards, without ever touching the user's collectives.

Why this exists: a ``DTensor`` mixed with plain tensors in one ``cat`` raises (``aten.cat.default
got mixed torch.Tensor and DTensor``), and reducing a ``DTensor`` on one rank only (a NaN found
there) would issue a collective the other ranks never join. So every statistic is taken on the
rank's local shard (:func:`local_view`), and the shards' records are combined on logging steps
only, which the step clock makes the same steps on every rank (see ``StepClock``):

1. each rank computes, per sharded tag, its shard's count, non-finite count, min, max, sum and
   sum of squares (finite values only);
2. one ``all_reduce(MAX)`` of ``(-min, max)`` agrees on every tag's range;
3. each rank bins its shard over that range, and one ``all_reduce(SUM)`` of
   ``(count, non-finite, sum, sum of squares, bin counts)`` gives the histogram an unsharded
   run would have: the same count, min and max, the same mean up to float rounding (and the same
   bins for tensors small enough to be binned exactly, see ``stats.SAMPLE_LIMIT``).

The two collectives run on a process group of our own (gloo, on the host copies of the small
rows), so they can never pair with one of FSDP's, and its timeout (``RANK_WAIT_S``) bounds the
wait: a rank that does not watch, or that failed, costs the others that wait once; then they warn
and stop combining. Every rank combines the same list of tags, in the same order (the watched
parameters' names); a tag no rank has this step (no gradient yet) is simply not written.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from .._torch import fsdp1_flat_handle
from ..errors import IntrospectWarning, warn
from ..runtime.distributed import SideGroup, rank_and_world
from .stats import HIST_BINS, HistogramRecord, RecordBatch

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.tensor import DTensor

__all__ = [
    "is_dtensor",
    "local_view",
    "has_dtensor_parameters",
    "user_type_name",
    "fsdp1_parameters",
    "shard_combiner",
    "ShardCombiner",
    "ShardRecords",
]

_EMPTY = (0.0, 0.0, math.inf, -math.inf, 0.0, 0.0)  # count, non-finite, min, max, sum, sum^2


_DTENSOR: list[type] = []
"""``DTensor``, imported on first use and kept: an import statement in a function costs ~10 us a
call, and ``local_view`` runs for every tensor of a logging step."""


def _dtensor_type() -> type | None:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - a torch built without distributed
            return None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel)."""
    cls = _DTENSOR[0] if _DTENSOR else _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's own values: a ``DTensor``'s local shard, any other tensor itself. Reading it
    issues no collective, so it is safe on one rank alone."""
    if type(tensor) is torch.Tensor or type(tensor) is nn.Parameter:  # the common case: no isinstance walk
        return tensor
    return tensor.to_local() if is_dtensor(tensor) else tensor


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (its weights and gradients are shards)."""
    return any(is_dtensor(p) for p in model.parameters())


def user_type_name(module: nn.Module) -> str:
    """The class name the user wrote: FSDP2 swaps a module's class for ``FSDP{name}``, a subclass
    of ``(FSDPModule, the user's class)``."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        return cls.__bases__[1].__name__
    return cls.__name__


FLAT_PARAMETER_WARNING = (
    "introspect: FSDP without use_orig_params=True keeps every parameter of a wrapped module in one "
    "flat shard, so weights/ and grads/ can only show that flat shard, not your layers; wrap with "
    "FullyShardedDataParallel(..., use_orig_params=True) for per-parameter histograms"
)


def fsdp1_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters FSDP1 (``FullyShardedDataParallel``) keeps as views of each rank's
    flat shard (``use_orig_params=True``): each rank holds a piece of them, maybe none. Warns once
    when a unit flattens its parameters away (``use_orig_params=False``)."""
    found: set[int] = set()
    flat = False
    for module in model.modules():
        if type(module).__name__ != "FullyShardedDataParallel":
            continue
        handle = fsdp1_flat_handle(module)
        if handle is None:
            continue
        orig, params = handle
        if orig:
            found.update(id(p) for p in params)
        else:
            flat = True
    if flat:
        warn(FLAT_PARAMETER_WARNING, IntrospectWarning)
    return found


def _replicas(tensor: DTensor) -> int:
    """How many ranks hold each value of a DTensor (its ``Replicate`` mesh dimensions): summed
    over the world, counts and sums are that many times too large."""
    from torch.distributed.tensor import Replicate

    mesh = tensor.device_mesh
    return math.prod(mesh.size(d) for d, p in enumerate(tensor.placements) if isinstance(p, Replicate))


class ShardCombiner:
    """The process group and state of one watcher's combination of shard records."""

    def __init__(self, tags: list[str], group: SideGroup) -> None:
        self.tags = tags
        """Every sharded tag, in one order that every rank shares."""
        self.group = group
        self.broken = False
        self.flat_views = False
        """FSDP1's views: their gradients are set at the end of backward, without the
        accumulation hooks a gradient probe would otherwise hear (see ``probes/grads.py``)."""

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        self.group.all_reduce(tensor, op)

    def combine(self, shards: ShardRecords) -> dict[str, HistogramRecord]:
        """Every rank's shards of every tag as one histogram per tag (the same on every rank);
        ``{}`` once combining has failed (a rank that never came)."""
        if self.broken or not self.tags:
            return {}
        try:
            return self._combine(shards)
        except Exception as e:  # a timeout: some rank did not join; never hang, never crash training
            self.broken = True
            warn(
                "introspect: the ranks' weight and gradient shards could not be combined "
                f"({type(e).__name__}: {e}); sharded weights/ and grads/ histograms stop here "
                "(does every rank call watch()?)",
                IntrospectWarning,
            )
            return {}

    def _combine(self, shards: ShardRecords) -> dict[str, HistogramRecord]:
        dist = torch.distributed
        n = len(self.tags)
        local = torch.tensor([_EMPTY] * n, dtype=torch.float64)
        present = [i for i, t in enumerate(self.tags) if t in shards.index]
        order = [shards.index[self.tags[i]] for i in present]
        if present:
            local[present] = shards.batch.local_stats()[order]
        ranges = torch.stack([-local[:, 2], local[:, 3]], dim=1)
        self._all_reduce(ranges, dist.ReduceOp.MAX)  # 1: the range every rank bins over
        lo, hi = -ranges[:, 0], ranges[:, 1]
        sums = torch.zeros(n, 4 + HIST_BINS, dtype=torch.float64)
        sums[:, :2] = local[:, :2]
        sums[:, 2:4] = local[:, 4:6]
        if present:  # each of this rank's records binned over its tag's agreed range
            at = torch.zeros(len(shards.batch), dtype=torch.long)
            at[order] = torch.tensor(present)
            sums[present, 4:] = shards.batch.counts_over(lo[at], hi[at])[order]
        self._all_reduce(sums, dist.ReduceOp.SUM)  # 2: counts, sums and bins of all the shards
        replicas = torch.tensor([float(shards.replicas.get(t, 1)) for t in self.tags], dtype=torch.float64)
        sums /= replicas.unsqueeze(1)
        found: dict[str, HistogramRecord] = {}
        for i, tag in enumerate(self.tags):
            count, nonfinite, total, squares = sums[i, :4].tolist()
            if count == 0:
                continue
            finite = count > nonfinite
            found[tag] = HistogramRecord(
                numel=round(count),
                nonfinite=nonfinite,
                min=float(lo[i]) if finite else 0.0,
                max=float(hi[i]) if finite else 0.0,
                sum=total,
                sum_squares=squares,
                counts=tuple(sums[i, 4:].tolist()),
            )
        return found


def shard_combiner(
    model: nn.Module, params: dict[str, nn.Parameter], log: Any, group: SideGroup
) -> ShardCombiner | None:
    """The combiner of a watch whose parameters are sharded over a process group of several ranks
    (DTensors, or FSDP1's views of its flat shards; None otherwise): its tags are ``weights/`` and
    ``grads/`` of every watched sharded parameter, as far as ``log`` asks for them. ``model``: the
    model as passed to ``watch`` (an FSDP1 root included)."""
    if rank_and_world()[1] == 1:
        return None
    fsdp1 = fsdp1_parameters(model)
    sharded = [name for name, p in params.items() if is_dtensor(p) or id(p) in fsdp1]
    if not sharded:
        return None
    from .tags import tag

    kinds = [kind for kind in ("weights", "grads") if kind in log]
    combiner = ShardCombiner([tag(kind, name) for kind in kinds for name in sharded], group)
    combiner.flat_views = bool(fsdp1)
    return combiner


class ShardRecords:
    """One step's records of sharded tensors: each rank's local shard, combined at the step's end."""

    def __init__(self, combiner: ShardCombiner) -> None:
        self.combiner = combiner
        self.batch = RecordBatch()
        self.index: dict[str, int] = {}
        self.replicas: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def set(self, tag: str, tensor: torch.Tensor) -> None:
        """This rank's shard of ``tensor`` (a DTensor) as ``tag``'s record; a later call replaces it
        (an empty shard, as FSDP gives a rank when a dimension is smaller than the world, still
        counts: it makes the rank join with nothing to add)."""
        self.replicas[tag] = _replicas(tensor) if is_dtensor(tensor) else 1
        shard = local_view(tensor)
        if shard.numel() == 0:
            self.index.pop(tag, None)
            return
        self.index[tag] = self.batch.add(shard)

    def combine(self) -> dict[str, HistogramRecord]:
        found = self.combiner.combine(self)
        self.batch, self.index = RecordBatch(), {}
        return found

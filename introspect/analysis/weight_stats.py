"""Statistics of a saved model's weights, their histograms, and how two checkpoints differ.

>>> stats = weight_stats(load_weights("ckpt.pt"))                 # doctest: +SKIP
>>> print(format_weight_stats(stats))                              # doctest: +SKIP

Histograms go through the same records as ``watch`` (``weights/{param}`` tags, binned on the
tensor's device, NaN/Inf counted rather than dropped), so a checkpoint looks in TensorBoard the
way the run that produced it did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..records.sinks import write_step
from ..records.step import StepBuffer
from ..records.tags import tag
from ..terminal import escape, format_table, progress

__all__ = [
    "WeightStats",
    "WeightChange",
    "weight_stats",
    "format_weight_stats",
    "write_weight_histograms",
    "compare_weights",
    "format_weight_changes",
    "readable",
]


@dataclass(frozen=True)
class WeightStats:
    """One tensor's numbers; mean, std, min and max are over its finite values."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    nonfinite: int


@dataclass(frozen=True)
class WeightChange:
    """How one tensor moved between two checkpoints: ``|b - a| / |a|`` (L2 norms) and the largest
    element-wise change; ``status`` says when it cannot be compared.

    A tensor that is all zero in A (a zero-initialised bias, a LoRA ``B`` matrix) has no relative
    change: any move is infinitely large against zero, and "inf" would rank it above every real
    change. Its ``relative_change`` is NaN, ``from_zero`` is True, and ``absolute_change``
    (``|b - a|``, L2) says how far it moved; it never ranks as the tensor that moved most."""

    name: str
    shape: tuple[int, ...]
    relative_change: float
    max_abs_change: float
    status: str  # "compared", "only in A", "only in B", "shape differs"
    absolute_change: float = math.nan
    """``|b - a|`` (L2 norm) of a compared tensor."""
    from_zero: bool = False
    """A is all zero and B is not: the change is absolute only (``relative_change`` is NaN)."""


def weight_stats(weights: Mapping[str, torch.Tensor], show_progress: bool = False) -> list[WeightStats]:
    """Per-tensor statistics, in the mapping's order."""
    out = []
    for name, t in progress(weights.items(), show_progress, total=len(weights), desc="weights", unit="tensor"):
        values = readable(t)
        if values is None:
            nan = math.nan
            out.append(WeightStats(name, tuple(t.shape), nan, nan, nan, nan, nan, 0))
            continue
        x = values.reshape(-1)
        finite_mask = torch.isfinite(x)
        finite = x[finite_mask].double()
        n = finite.numel()
        out.append(
            WeightStats(
                name=name,
                shape=tuple(t.shape),
                mean=float(finite.mean()) if n else math.nan,
                std=float(finite.std(correction=0)) if n else math.nan,
                min=float(finite.min()) if n else math.nan,
                max=float(finite.max()) if n else math.nan,
                zero_fraction=float((x == 0).sum()) / max(x.numel(), 1),
                nonfinite=int(x.numel() - int(finite_mask.sum())),
            )
        )
    return out


def readable(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` detached, and upcast to float32 when it is a one-byte float (``float8_e4m3fn``,
    safetensors ``F8_E4M3``, ...): torch has no ``isfinite`` or histogram for most of them, and
    float32 holds every value they can. None for a packed float4 tensor (two values a byte, which
    torch cannot convert): its values are not summarised."""
    t = t.detach()
    if not t.is_floating_point() or t.element_size() != 1:
        return t
    try:
        return t.float()
    except (NotImplementedError, RuntimeError):
        return None


def format_weight_stats(stats: Sequence[WeightStats]) -> str:
    """The terminal table: one row per tensor, then the totals."""
    rows = [
        [s.name, str(list(s.shape)), s.mean, s.std, s.min, s.max, f"{s.zero_fraction:.1%}", s.nonfinite] for s in stats
    ]
    table = format_table(
        ["name", "shape", "mean", "std", "min", "max", "zeros", "non-finite"],
        rows,
        right=[False, False, True, True, True, True, True, True],
    )
    total = sum(math.prod(s.shape) for s in stats)
    bad = sum(s.nonfinite for s in stats)
    return f"{table}\n{len(stats)} tensors, {total:,} values" + (f", {bad:,} non-finite" if bad else "")


def write_weight_histograms(writer: Any, weights: Mapping[str, torch.Tensor], step: int = 0) -> None:
    """``weights/{name}`` histograms of every tensor at ``step``, as one event."""
    buffer = StepBuffer(step=step, logging=True, checking=False)
    for name, t in weights.items():
        values = readable(t)
        if values is not None:
            buffer.add_histogram(tag("weights", name), values)
    write_step(writer, buffer.to_host())


def compare_weights(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], show_progress: bool = False
) -> list[WeightChange]:
    """Per-tensor change from ``a`` to ``b``: A's names in order, then those only in B."""
    out = []
    for name, x in progress(a.items(), show_progress, total=len(a), desc="compare", unit="tensor"):
        if name not in b:
            out.append(WeightChange(name, tuple(x.shape), math.nan, math.nan, "only in A"))
            continue
        y = b[name]
        if x.shape != y.shape:
            out.append(WeightChange(name, tuple(x.shape), math.nan, math.nan, f"shape differs: {list(y.shape)} in B"))
            continue
        xs, ys = readable(x), readable(y)
        if xs is None or ys is None:
            out.append(WeightChange(name, tuple(x.shape), math.nan, math.nan, f"{x.dtype} cannot be read"))
            continue
        x64, y64 = xs.double(), ys.to(x.device).double()
        diff = y64 - x64
        delta = torch.linalg.vector_norm(diff)
        base = torch.linalg.vector_norm(x64)
        size, moved = float(base), float(delta)
        finite = math.isfinite(size) and math.isfinite(moved)
        from_zero = finite and size == 0 and moved != 0  # no scale to be relative to: absolute only
        if finite and size > 0:
            relative = moved / size
        else:
            relative = 0.0 if finite and moved == 0 else math.nan  # NaN: from zero, or NaN/Inf values
        biggest = float(diff.abs().max()) if x.numel() else 0.0
        out.append(WeightChange(name, tuple(x.shape), relative, biggest, "compared", moved, from_zero))
    out += [WeightChange(n, tuple(t.shape), math.nan, math.nan, "only in B") for n, t in b.items() if n not in a]
    return out


def _change_cells(c: WeightChange) -> list[str]:
    if c.status != "compared":
        return ["—", "—", c.status]
    if c.from_zero:
        return [f"{c.absolute_change:.3e} abs", f"{c.max_abs_change:.3e}", "zero in A: absolute change |B - A|"]
    if math.isnan(c.relative_change):
        return ["—", "—", "NaN/Inf values"]
    return [f"{c.relative_change:.3e}", f"{c.max_abs_change:.3e}", ""]


def format_weight_changes(changes: Sequence[WeightChange]) -> str:
    """The terminal table of a comparison, then one line naming the tensor that moved most
    (relative to its size in A; a tensor that was zero in A is counted apart, by its absolute change)."""
    rows = [[c.name, str(list(c.shape)), *_change_cells(c)] for c in changes]
    table = format_table(
        ["name", "shape", "relative change", "max |change|", "note"], rows, right=[False, False, True, True, False]
    )
    compared = [c for c in changes if c.status == "compared" and (c.from_zero or not math.isnan(c.relative_change))]
    relative = [c for c in compared if c.relative_change > 0]  # NaN (from zero) compares False
    from_zero = [c for c in compared if c.from_zero]
    lines = [table, f"{len(compared)} tensors compared, {len(relative) + len(from_zero)} changed"]
    if relative:
        top = max(relative, key=lambda c: c.relative_change)
        lines[-1] += f"; most: {escape(top.name)} ({top.relative_change:.3e} relative)"
    if from_zero:
        top = max(from_zero, key=lambda c: c.absolute_change)
        lines[-1] += (
            f"; {len(from_zero)} zero in A, changed by an absolute amount "
            f"(largest: {escape(top.name)}, |B - A| = {top.absolute_change:.3e})"
        )
    skipped = len(changes) - len(compared)
    if skipped:
        lines[-1] += f"; {skipped} not comparable"
    return "\n".join(lines)

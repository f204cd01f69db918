"""On-device statistics of one tensor: everything a TensorBoard histogram needs, in a few passes.

Why not ``torch.histc`` or ``SummaryWriter.add_histogram``: on a 1.8M-value conv output they cost
5-15 ms on CPU (20-100 memory passes), need the range as Python floats (a host sync per tensor on
GPU) and refuse NaN/Inf. A "record" here is one small 1-D tensor computed where the tensor lives:

    [nonfinite, min, max, sum, sum_squares, count_0 ... count_{HIST_BINS-1}]

* ``min``/``max`` are exact (one ``aminmax`` pass), and so are ``sum``/``sum_squares`` (one ``sum``
  and one ``dot``) whenever the tensor is finite;
* the bucket counts are exact for tensors of at most ``SAMPLE_LIMIT`` values; for larger ones they
  are the histogram of a fixed strided sample of about ``SAMPLE_LIMIT`` values, scaled so that the
  counts add up to the number of finite values. The stride is a prime that divides none of the
  tensor's trailing dimension products, so the sample walks across channels, rows and columns
  rather than down one of them;
* non-finite values are left out of the histogram and counted instead. The count is exact when
  the tensor is finite (it is then 0) or small; for a large tensor holding NaN/Inf it is
  estimated from the sample (and is at least 1, so such a tensor is never reported clean).

Many records of one step are stacked and moved to the host in one transfer (see ``step.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HIST_BINS", "SAMPLE_LIMIT", "HistogramRecord", "tensor_record", "sample_stride"]

HIST_BINS = 32
"""Buckets per histogram. TensorBoard re-bins to 30 for display; more only adds event bytes, which
tensorboard's writer checksums in pure Python (~0.1 us per byte)."""

SAMPLE_LIMIT = 1 << 14
"""Tensors up to this many values get exact bucket counts; larger ones are sampled."""

RECORD_LEN = 5 + HIST_BINS

_FULL_PRECISION = (torch.float32, torch.float64)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    k = 3
    while k * k <= n:
        if n % k == 0:
            return False
        k += 2
    return True


def sample_stride(shape: torch.Size | tuple[int, ...]) -> int:
    """The step between sampled elements of a tensor of this shape (1: use every element)."""
    n = math.prod(shape)
    if n <= SAMPLE_LIMIT:
        return 1
    suffix_products = []
    p = 1
    for dim in reversed(tuple(shape)[1:]):
        p *= dim
        suffix_products.append(p)
    s = -(-n // SAMPLE_LIMIT)
    while not (_is_prime(s) and all(q % s for q in suffix_products)):
        s += 1
    return s


def stat_dtype(device: torch.device) -> torch.dtype:
    """float64 where the backend has it: bucket counts of big tensors exceed float32's 2**24."""
    return torch.float32 if device.type == "mps" else torch.float64


def tensor_record(x: torch.Tensor) -> torch.Tensor:
    """The statistics of ``x`` as a ``RECORD_LEN`` tensor on ``x``'s device; no host sync.

    The arithmetic runs in float32 (float64 stays float64): half-precision values are widened, and
    float32 is several times faster than float64 on CPU. Only the finished record is widened to
    ``stat_dtype`` so that scaled bucket counts of huge tensors stay exact integers.
    """
    x = x.detach()
    dt = stat_dtype(x.device)
    flat = x.reshape(-1)
    if flat.dtype not in _FULL_PRECISION:
        flat = flat.float()
    n = flat.numel()
    stride = sample_stride(x.shape)
    sample = flat[::stride].contiguous() if stride > 1 else flat
    finite = torch.isfinite(sample)
    weights = finite.to(sample.dtype)
    n_finite_sample = weights.sum()
    clean = torch.where(finite, sample, 0.0)
    lo = torch.where(finite, sample, math.inf).amin()
    hi = torch.where(finite, sample, -math.inf).amax()
    total = clean.sum()
    squares = torch.dot(clean, clean)
    if stride > 1:
        mn, mx = torch.aminmax(flat)
        all_finite = torch.isfinite(mn) & torch.isfinite(mx)
        lo = torch.where(all_finite, mn, lo)
        hi = torch.where(all_finite, mx, hi)
    width = hi - lo
    usable = width > 0  # false for a constant tensor and for one with no finite value at all
    scale = torch.where(usable, HIST_BINS / width, 0.0)
    offset = torch.where(usable, lo, 0.0)
    index = ((clean - offset) * scale).floor_().clamp_(0, HIST_BINS - 1).long()
    counts = torch.zeros(HIST_BINS, dtype=sample.dtype, device=x.device).index_add_(0, index, weights)
    head = torch.stack([n_finite_sample, lo, hi, total, squares]).to(dt)
    counts = counts.to(dt)
    if stride == 1:
        head[0] = n - head[0]  # nonfinite, exact
        return torch.cat([head, counts])
    # Scale the sample up to the whole tensor; exact sums where the tensor is finite.
    n_sample = sample.numel()
    estimated = ((n_sample - head[0]) * (n / n_sample)).clamp_min(1.0)
    nonfinite = torch.where(all_finite, 0.0, estimated)
    ratio = (n - nonfinite) / head[0].clamp_min(1.0)
    exact = torch.stack([flat.sum(), torch.dot(flat, flat)]).to(dt)
    head = torch.stack([
        nonfinite,
        head[1],
        head[2],
        torch.where(all_finite, exact[0], head[3] * ratio),
        torch.where(all_finite, exact[1], head[4] * ratio),
    ])
    return torch.cat([head, counts * ratio])


@dataclass(frozen=True)
class HistogramRecord:
    """A record on the host: the numbers of one histogram (finite values only) and the rest."""

    numel: int
    nonfinite: float
    min: float
    max: float
    sum: float
    sum_squares: float
    counts: tuple[float, ...]

    @classmethod
    def from_row(cls, numel: int, row: list[float]) -> "HistogramRecord":
        return cls(numel, row[0], row[1], row[2], row[3], row[4], tuple(row[5:]))

    @property
    def finite_count(self) -> float:
        return max(self.numel - self.nonfinite, 0.0)

    @property
    def norm(self) -> float:
        """L2 norm of the finite values; NaN when the tensor held NaN/Inf (its norm is not finite)."""
        return math.sqrt(max(self.sum_squares, 0.0)) if self.nonfinite == 0 else math.nan

    def edges(self) -> list[float]:
        """Right edges of the buckets (TensorBoard's ``bucket_limit``)."""
        width = (self.max - self.min) / len(self.counts)
        return [self.min + width * (i + 1) for i in range(len(self.counts))]

    @staticmethod
    def merge(records: list["HistogramRecord"]) -> "HistogramRecord":
        """One histogram for several calls of a module in one step (a shared block, an RNN cell).

        Buckets of different ranges are re-binned onto the union range, each bucket's count spread
        over the new buckets in proportion to overlap (values assumed uniform inside a bucket).
        """
        if len(records) == 1:
            return records[0]
        filled = [r for r in records if r.finite_count > 0]
        lo = min((r.min for r in filled), default=0.0)
        hi = max((r.max for r in filled), default=0.0)
        bins = len(records[0].counts)
        merged = [0.0] * bins
        width = (hi - lo) / bins
        for r in filled:
            if width == 0 or r.max == r.min:
                target = 0 if width == 0 else min(int((r.min - lo) / width), bins - 1)
                merged[target] += sum(r.counts)
                continue
            r_width = (r.max - r.min) / len(r.counts)
            for i, c in enumerate(r.counts):
                if c == 0:
                    continue
                a, b = r.min + i * r_width, r.min + (i + 1) * r_width
                first, last = int((a - lo) / width), min(int((b - lo) / width), bins - 1)
                for j in range(first, last + 1):
                    overlap = min(b, lo + (j + 1) * width) - max(a, lo + j * width)
                    merged[j] += c * max(overlap, 0.0) / r_width
        return HistogramRecord(
            numel=sum(r.numel for r in records),
            nonfinite=sum(r.nonfinite for r in records),
            min=lo,
            max=hi,
            sum=sum(r.sum for r in filled),
            sum_squares=sum(r.sum_squares for r in filled),
            counts=tuple(merged),
        )

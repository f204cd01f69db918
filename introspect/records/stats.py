"""On-device statistics of one tensor: everything a TensorBoard histogram needs, in a few passes.

Why not ``torch.histc`` or ``SummaryWriter.add_histogram``: on a 1.8M-value conv output they cost
5-15 ms on CPU (20-100 memory passes), need the range as Python floats (a host sync per tensor on
GPU) and refuse NaN/Inf. A "record" here is one small 1-D tensor computed where the tensor lives:

    [nonfinite, min, max, sum, sum_squares, count_0 ... count_{HIST_BINS-1}]

* ``min``/``max`` are exact, and so are ``sum``/``sum_squares`` whenever the tensor is finite (for
  large tensors one ``aminmax``, one ``sum`` and one ``dot`` pass; small ones are reduced from
  their copies, many tensors at once);
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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._torch import tensor_version

__all__ = ["HIST_BINS", "SAMPLE_LIMIT", "HistogramRecord", "RecordBatch", "tensor_record", "sample_stride"]

HIST_BINS = 32
"""Buckets per histogram. TensorBoard re-bins to 30 for display; more only adds event bytes, which
tensorboard's writer checksums in pure Python (~0.1 us per byte)."""

SAMPLE_LIMIT = 1 << 14
"""Tensors up to this many values get exact bucket counts; larger ones are sampled."""

BATCHED_LIMIT = 1 << 11
"""Tensors up to this many values get their min/max/sums from ``compute``'s segment reductions
(about 3 ns per value on CPU, against ~3 us of dispatch per op for three ops of their own)."""

RECORD_LEN = 5 + HIST_BINS

_SPREAD_BY_REPEAT = 1 << 14
"""Up to this many sampled values in a step, per-value parameters come from repeat_interleave."""

_SPREAD_BY_EXPAND = 32
"""Above this many records, per-value parameters come from repeat_interleave whatever the size: a
constant number of ops (one expand per record would grow with the model; measured on the 2-core
CPU, 600 records of 700 values: 0.5 ms against 10 ms)."""

_MAX_GROUPS = 16
"""Records of at most this many distinct lengths are computed a length at a time
(``_compute_by_length``); more take the segment reductions over one concatenation."""

_FULL_PRECISION = (torch.float32, torch.float64)

_HELD = torch.empty(0)
"""The place of a held tensor's sample until ``flush`` (never computed on)."""


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


def _bin_transform(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset and scale that map ``[lo, hi]`` onto buckets ``0..HIST_BINS``; a constant tensor, or
    one whose range is NaN/Inf, maps everything to bucket 0."""
    width = hi - lo
    usable = width > 0
    return torch.where(usable, lo, 0.0), torch.where(usable, HIST_BINS / width, 0.0)


def _bucket_position(
    values: torch.Tensor,
    offset: torch.Tensor,
    scale: torch.Tensor,
    in_place: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each value's bucket as a float in ``[0, HIST_BINS - 1]``: truncating it is its floor, and
    int32 converts much faster than int64 on CPU. NaN goes to bucket 0. ``in_place``: computed
    in ``values`` (the caller's own copy), the same numbers; ``out``: computed there."""
    shifted = values.sub_(offset) if in_place else torch.sub(values, offset, out=out)
    return shifted.mul_(scale).nan_to_num_(0.0).clamp_(0, HIST_BINS - 1)


def _bucket_into(bucket: torch.Tensor, block: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> None:
    """The buckets of ``block``'s rows (``offset``/``scale`` one per row) into the int32 tensor
    ``bucket`` of the block's shape, through that same memory: the float positions are computed in
    it (seen as float32, the same size) and truncated to int32 in place (an elementwise cast reads
    each value before it writes it; tested against ``.to(torch.int32)`` in tests/records). No
    temporary the size of the block: on CPU a fresh one costs more in new pages than the
    arithmetic (mlp201: 0.27 ms per (200, 2048) block)."""
    position = _bucket_position(block, offset, scale, out=bucket.view(torch.float32))
    bucket.copy_(position)


def _block_buckets(
    blocks: list[torch.Tensor], index: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Every value's bucket plus its record's base (``index``: the records in the blocks' row
    order), written into one int32 buffer block by block: no per-block int copy and no
    concatenation after, each a fresh buffer the size of the step's values, whose new pages cost
    more than the arithmetic on CPU. Truncated before the base is added (see ``compute``)."""
    bucket = torch.empty(sum(b.numel() for b in blocks), dtype=torch.int32, device=index.device)
    start = filled = 0
    for block in blocks:
        rows = index[start : start + block.shape[0]]
        start += block.shape[0]
        target = bucket[filled : filled + block.numel()].view(block.shape)
        filled += block.numel()
        _bucket_into(target, block, offset[rows].unsqueeze(1), scale[rows].unsqueeze(1))
        target.add_((rows.to(torch.int32) * HIST_BINS).unsqueeze(1))
    return bucket


def _bucket_counts(bucket: torch.Tensor, n_records: int) -> torch.Tensor:
    """The counts of every record's buckets, ``n_records * HIST_BINS`` long."""
    if bucket.device.type == "cpu":
        return torch.bincount(bucket, minlength=n_records * HIST_BINS)
    # bincount sizes its output from the data: a host sync on accelerators
    counts = torch.zeros(n_records * HIST_BINS, dtype=torch.float32, device=bucket.device)
    return counts.index_add_(0, bucket, torch.ones(bucket.shape, dtype=torch.float32, device=bucket.device))


class RecordBatch:
    """Records of many tensors computed together: a step's histograms in a dozen device ops.

    ``add`` runs in the hook, while the tensor is alive, and does as little as it can there:

    * a small tensor (at most ``BATCHED_LIMIT`` values, float32 or narrower) is copied once as
      float32, and nothing else: its exact min, max, sum and sum of squares are computed in
      ``compute`` from that copy, for all small tensors of the step at once (segment reductions).
      On a small model every per-tensor op is a few microseconds of dispatch, so one op per tensor
      instead of six is what makes a logging step cheap;
    * a larger tensor gets the exact ``aminmax``, ``sum`` (or the non-finite check's sum of the
      same tensor, passed as ``total``) and ``dot`` of the whole tensor, and a float32 copy of its
      strided sample of at most ``SAMPLE_LIMIT`` values.

    Nothing else is kept, so the activation itself is free to go. ``compute`` bins all samples at
    once: one concatenation and one ``bincount`` for every histogram of the step.

    The bins of a tensor holding NaN/Inf cannot use its (non-finite) range; such rows come back
    with a non-finite min, max or sum, and ``masked_rows`` recomputes them from the finite values
    of their samples. That second pass (and its second transfer) only happens when something is
    already wrong.
    """

    def __init__(self) -> None:
        self._samples: list[torch.Tensor] = []
        self._numels: list[int] = []
        self._stats: dict[int, tuple[torch.Tensor, ...]] = {}  # min, max, sum, sum_sq of large tensors
        self._held: dict[int, torch.Tensor] = {}  # small tensors by reference
        self._held_versions: list[int] = []  # their versions when added, in the order of _held
        self._watched: dict[int, tuple[torch.Tensor, int]] = {}  # copied ones, versions checked at flush
        self.changed: list[int] = []
        """Records whose tensor was changed in place between ``add`` and ``flush`` (see ``add``)."""
        self._blocks: list[tuple[list[int], torch.Tensor]] = []
        """The held records ``flush`` copied, one ``(records, block)`` per shape: each record's
        sample is a row of its block."""

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def numels(self) -> list[int]:
        """Each record's tensor size, in record order."""
        return self._numels

    def add(self, x: torch.Tensor, total: torch.Tensor | None = None, hold: bool = False, watch: bool = False) -> int:
        """Take what the record of ``x`` needs now; returns the record's index in ``compute()``.

        ``total``: ``x``'s float32 sum when the caller has it already (the non-finite check's).
        ``hold``: a small tensor is kept by reference, no op at all now, and copied with every
        other held tensor in one ``flush`` (one ``cat``): the caller knows nothing changes it in
        place before then. ``watch``: a small tensor is copied now, and ``flush`` says (in
        ``changed``) whether it was changed in place since, which tells the caller whether the
        tensors of this kind may be held next time.
        """
        n = x.numel()
        index = len(self._samples)
        small = n <= BATCHED_LIMIT and x.dtype != torch.float64
        if small and hold:  # (no tuple per tensor: a logging step holds hundreds)
            self._held[index] = x
            self._held_versions.append(tensor_version(x))
            self._samples.append(_HELD)  # (filled in by flush)
            self._numels.append(n)
            return index
        if small and watch:
            self._watched[index] = (x, tensor_version(x))
        flat = x.detach().reshape(-1)
        if n <= BATCHED_LIMIT and flat.dtype != torch.float64:
            # A copy: the tensor may be changed in place after the hook (ReLU(inplace=True)).
            self._samples.append(flat.to(torch.float32, copy=True))
            self._numels.append(n)
            return index
        if flat.dtype not in _FULL_PRECISION:
            flat = flat.float()
        stride = sample_stride(x.shape)
        sample = (flat[::stride] if stride > 1 else flat).to(torch.float32, copy=True)
        mn, mx = torch.aminmax(flat)
        if total is None or flat.dtype != torch.float32:
            total = flat.sum()
        stats = (mn, mx, total, torch.dot(flat, flat))
        self._samples.append(sample)  # only now: a tensor that cannot be read leaves no trace
        self._numels.append(n)
        self._stats[index] = stats
        return index

    def flush(self) -> None:
        """Copy the tensors held by reference now: one ``stack`` per distinct shape (and dtype) and
        device, a constant number of ops whatever their number; each record's sample is then a
        row of that block, and ``compute`` reduces and bins the block as it is (one copy of each
        value, not a flat copy and a stack of it again). Records whose tensor changed in place
        since ``add`` go to ``changed``."""
        for index, (x, version) in self._watched.items():
            if tensor_version(x) != version:
                self.changed.append(index)
        self._watched = {}
        if not self._held:
            return
        held, self._held = self._held, {}
        versions, self._held_versions = self._held_versions, []
        self.changed.extend(i for (i, x), v in zip(held.items(), versions) if tensor_version(x) != v)
        groups: dict[tuple, list[int]] = {}
        for index, x in held.items():
            groups.setdefault((x.shape, x.dtype, x.device), []).append(index)
        with torch.no_grad():
            for members in groups.values():
                tensors = [held[i] for i in members]
                block = torch.stack(tensors).view(len(members), -1)
                if block.dtype != torch.float32:
                    block = block.float()
                for index, row in zip(members, block.unbind(0)):
                    self._samples[index] = row
                self._blocks.append((members, block))

    def _stat_rows(self, lengths: list[int], values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """``(len(self), 4)``: min, max, sum, sum of squares of every record, float32."""
        small = [i for i in range(len(self._samples)) if i not in self._stats]
        rows = []
        if small:
            if len(small) == len(self._samples):
                v, seg = values, sizes
            else:
                v = torch.cat([self._samples[i] for i in small])
                seg = torch.tensor([lengths[i] for i in small], device=v.device)
            rows.append(
                torch.stack(
                    [
                        torch.segment_reduce(v, "min", lengths=seg),
                        torch.segment_reduce(v, "max", lengths=seg),
                        torch.segment_reduce(v, "sum", lengths=seg),
                        torch.segment_reduce(v * v, "sum", lengths=seg),
                    ],
                    dim=1,
                )
            )
        if self._stats:
            large = torch.stack([t for stats in self._stats.values() for t in stats]).to(torch.float32)
            rows.append(large.view(-1, 4))
        if not self._stats or not small:
            return rows[0]
        order = small + list(self._stats)  # rows[0] then rows[1]: put them back in record order
        stacked = torch.cat(rows)
        return stacked[torch.tensor(order, device=stacked.device).argsort()]

    def compute(self) -> torch.Tensor:
        """``(len(self), RECORD_LEN)`` rows on the tensors' device; see ``masked_rows`` for NaN/Inf."""
        self.flush()
        if not self._samples:
            return torch.zeros(0, RECORD_LEN, dtype=torch.float64)
        if len({sample.device for sample in self._samples}) > 1:
            return self._per_device()
        device = self._samples[0].device
        dt = stat_dtype(device)
        n_records = len(self._samples)
        lengths = [s.numel() for s in self._samples]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(lengths):
            groups.setdefault(k, []).append(i)
        if n_records > 1 and len(groups) <= _MAX_GROUPS and 0 not in groups:
            return self._compute_by_length(groups, lengths, device, dt)
        values = torch.cat(self._samples) if n_records > 1 else self._samples[0]
        sizes = torch.tensor(lengths, device=device)
        stats = self._stat_rows(lengths, values, sizes)
        # A NaN/Inf range bins everything into bucket 0; masked_rows redoes those rows.
        offset, scale = _bin_transform(stats[:, 0], stats[:, 1])
        # Per-value offset, scale and bucket base (record * HIST_BINS), each a contiguous 1-D
        # tensor. On CPU, repeat_interleave is a slow gather (~1 ms per 200K values) and strided
        # columns of one (values, 3) spread make every op after them 3-5x slower; expanding each
        # record's scalar (a view) and concatenating is a fill. Small batches take the one op.
        base = torch.arange(n_records, device=device, dtype=torch.int32) * HIST_BINS
        n = values.numel()
        if n <= _SPREAD_BY_REPEAT or n_records > _SPREAD_BY_EXPAND:
            offset_v, scale_v, base_v = (
                torch.repeat_interleave(column, sizes, output_size=n) for column in (offset, scale, base)
            )
        else:
            offset_v, scale_v, base_v = (
                torch.cat([c.expand(k) for c, k in zip(column.unbind(0), lengths)]) for column in (offset, scale, base)
            )
        # Truncated before the record's base is added (as in counts_over): a float32 position just
        # under a bucket edge would round up when added to a large base, and a value's bucket
        # would depend on where its record sits in the batch.
        # (values is this method's own concatenation when there are several records: in place)
        bucket = _bucket_position(values, offset_v, scale_v, in_place=n_records > 1).to(torch.int32).add_(base_v)
        return self._rows(stats, _bucket_counts(bucket, n_records), lengths, dt)

    def _rows(self, stats: torch.Tensor, counts: torch.Tensor, lengths: list[int], dt: torch.dtype) -> torch.Tensor:
        """``(len(self), RECORD_LEN)`` from the ``(records, 4)`` statistics and the bucket counts of
        the samples (``lengths`` values each), scaled up to each tensor's own size where sampled."""
        n_records, device = len(lengths), stats.device
        counts = counts.view(n_records, HIST_BINS).to(dt)
        if any(n != k for n, k in zip(self._numels, lengths)):
            scale_up = torch.tensor([n / k for n, k in zip(self._numels, lengths)], dtype=dt, device=device)
            counts = counts * scale_up.unsqueeze(1)
        head = torch.cat([torch.zeros(n_records, 1, dtype=dt, device=device), stats.to(dt)], dim=1)
        return torch.cat([head, counts], dim=1)

    def _compute_by_length(
        self, groups: dict[int, list[int]], lengths: list[int], device: torch.device, dt: torch.dtype
    ) -> torch.Tensor:
        """``compute`` for records of a few distinct lengths (a stack of blocks has a handful): the
        samples of one length stacked as a ``(records, length)`` matrix, reduced along its rows
        and binned with per-row parameters that broadcast, no per-value spread and no segment
        reduction (both cost ~3 ns a value on CPU, against ~0.3 ns for a row reduction); all
        histograms in one ``bincount``. About a dozen ops per distinct length."""
        order, blocks = self._blocks_by_length(groups, device)
        stats = self._block_stats(order, blocks, len(lengths), device)
        # A NaN/Inf range bins everything into bucket 0; masked_rows redoes those rows.
        offset, scale = _bin_transform(stats[:, 0], stats[:, 1])
        counts = _bucket_counts(_block_buckets(blocks, torch.tensor(order, device=device), offset, scale), len(lengths))
        return self._rows(stats, counts, lengths, dt)

    def _blocks_by_length(
        self, groups: dict[int, list[int]], device: torch.device
    ) -> tuple[list[int], list[torch.Tensor]]:
        """The samples as ``(records, length)`` blocks, and the records in the blocks' row order:
        the blocks ``flush`` made as they are (their rows are the samples), the other records of a
        length stacked. Neither is changed afterwards: masked_rows may read the samples."""
        flushed: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        for members, block in self._blocks:
            if block.device == device:
                flushed.setdefault(block.shape[1], []).append((members, block))
        order: list[int] = []
        blocks = []
        for k, members in groups.items():
            reused = flushed.get(k, [])
            taken = {i for rows, _ in reused for i in rows}
            rest = [i for i in members if i not in taken] if taken else members
            for rows, block in reused:
                order += rows
                blocks.append(block)
            if rest:
                order += rest
                samples = [self._samples[i] for i in rest]
                blocks.append(torch.stack(samples) if len(rest) > 1 else samples[0].view(1, k))
        return order, blocks

    def _block_stats(
        self, order: list[int], blocks: list[torch.Tensor], n_records: int, device: torch.device
    ) -> torch.Tensor:
        """``(records, 4)``: min, max, sum and sum of squares of every record, float32. A block of
        large tensors' samples is not reduced: their exact statistics came with them (``add``).
        (amin and amax: ``aminmax`` along a dimension is ~20x slower on CPU, torch 2.14: 817 us
        against 36 us for a (200, 2048) block; the sum of squares from the norm: no block-sized
        temporary.)"""
        stats = torch.empty(n_records, 4, dtype=torch.float32, device=device)
        reduced: list[tuple[list[int], torch.Tensor]] = []
        at = 0
        for block in blocks:
            members = order[at : at + block.shape[0]]
            at += block.shape[0]
            if not all(i in self._stats for i in members):
                norms = torch.linalg.vector_norm(block, dim=1)
                reduced.append(
                    (members, torch.stack([block.amin(dim=1), block.amax(dim=1), block.sum(dim=1), norms * norms], 1))
                )
        if reduced:
            where = [i for members, _ in reduced for i in members]
            stats[torch.tensor(where, device=device)] = torch.cat([values for _, values in reduced])
        if self._stats:  # large tensors: their exact statistics, not their sample's
            large = torch.stack([t for values in self._stats.values() for t in values]).to(torch.float32)
            stats[torch.tensor(list(self._stats), device=device)] = large.view(-1, 4)
        return stats

    def masked_rows(self, indices: list[int]) -> torch.Tensor:
        """Rows for tensors holding NaN/Inf: histogram and sums of the finite values only.

        Exact for tensors of at most ``SAMPLE_LIMIT`` values; for sampled ones the finite share,
        sums and range come from the sample (at least 1 non-finite value is always reported).
        """
        self.flush()
        rows = []
        for i in indices:
            sample, numel = self._samples[i], self._numels[i]
            dt = stat_dtype(sample.device)
            if sample.numel() == 0:  # an empty tensor: nothing to count (the watch writes no such tag)
                rows.append(torch.zeros(RECORD_LEN, dtype=dt, device=sample.device))
                continue
            finite = torch.isfinite(sample)
            weights = finite.to(torch.float32)
            n_finite = finite.sum().to(dt)
            clean = torch.where(finite, sample, 0.0)
            lo = torch.where(finite, sample, math.inf).amin()
            hi = torch.where(finite, sample, -math.inf).amax()
            offset, scale = _bin_transform(lo, hi)
            bucket = _bucket_position(clean, offset, scale).to(torch.int32)
            counts = torch.zeros(HIST_BINS, dtype=torch.float32, device=sample.device).index_add_(0, bucket, weights)
            n = sample.numel()
            nonfinite = ((n - n_finite) * (numel / n)).clamp_min(1.0) if n < numel else n - n_finite
            ratio = (numel - nonfinite) / n_finite.clamp_min(1.0)
            sums = torch.stack([clean.sum(), torch.dot(clean, clean)]).to(dt) * ratio
            head = torch.stack([torch.as_tensor(nonfinite, dtype=dt), lo.to(dt), hi.to(dt), sums[0], sums[1]])
            rows.append(torch.cat([head, counts.to(dt) * ratio]))
        return torch.stack(rows)

    def local_stats(self) -> torch.Tensor:
        """``(len(self), 6)`` float64 on the host: count, non-finite count, min, max, sum and sum of
        squares of every record, of its finite values only (min ``+inf``, max ``-inf`` when it has
        none): what the ranks' shards of one tensor add up from (see ``shards.py``)."""
        self.flush()
        device = self._samples[0].device
        lengths = [s.numel() for s in self._samples]
        values = torch.cat([s.to(device) for s in self._samples])
        stats = self._stat_rows(lengths, values, torch.tensor(lengths, device=device))
        rows = torch.cat([torch.zeros(len(lengths), 1), stats.cpu()], dim=1).to(torch.float64)
        broken = torch.nonzero(~torch.isfinite(rows[:, 1:3]).all(dim=1)).flatten().tolist()
        if broken:
            rows[broken] = self.masked_rows(broken)[:, :5].cpu().to(torch.float64)
            for i in broken:
                if rows[i, 0] >= self._numels[i]:  # no finite value: the empty range
                    rows[i, 1], rows[i, 2] = math.inf, -math.inf
        numels = torch.tensor(self._numels, dtype=torch.float64).unsqueeze(1)
        return torch.cat([numels, rows[:, :5]], dim=1)

    def counts_over(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``(len(self), HIST_BINS)`` float64 bucket counts on the host, each record binned over the
        range ``[lo[i], hi[i]]`` given to it (one the ranks agreed on) rather than its own. Only
        finite values count; a sample's counts are scaled up to its tensor's size, as in ``compute``."""
        self.flush()
        device = self._samples[0].device
        lengths = [s.numel() for s in self._samples]
        values = torch.cat([s.to(device) for s in self._samples])
        sizes = torch.tensor(lengths, device=device)
        offset, scale = _bin_transform(lo.to(device, torch.float32), hi.to(device, torch.float32))
        base = torch.arange(len(lengths), device=device, dtype=torch.int32) * HIST_BINS
        offset_v, scale_v, base_v = (
            torch.repeat_interleave(column, sizes, output_size=values.numel()) for column in (offset, scale, base)
        )
        # Truncated before the record's base is added: a float32 position just under a bucket edge
        # would round up when added to a large base, and a value's bucket depend on its record.
        bucket = _bucket_position(values, offset_v, scale_v).to(torch.int32) + base_v
        weights = torch.isfinite(values).to(torch.float32)
        counts = torch.zeros(len(lengths) * HIST_BINS, dtype=torch.float32, device=device).index_add_(
            0, bucket, weights
        )
        scale_up = torch.tensor([n / max(k, 1) for n, k in zip(self._numels, lengths)], dtype=torch.float64)
        return counts.view(len(lengths), HIST_BINS).cpu().to(torch.float64) * scale_up.unsqueeze(1)

    def _per_device(self) -> torch.Tensor:
        """A model split over devices: one batch per device, rows put back in order on the CPU."""
        rows = torch.zeros(len(self._samples), RECORD_LEN, dtype=torch.float64)
        for device in {sample.device for sample in self._samples}:
            members = [i for i, sample in enumerate(self._samples) if sample.device == device]
            sub = RecordBatch()
            sub._samples = [self._samples[i] for i in members]
            sub._numels = [self._numels[i] for i in members]
            sub._stats = {j: self._stats[i] for j, i in enumerate(members) if i in self._stats}
            rows[members] = sub.compute().cpu().to(torch.float64)
        return rows


def tensor_record(x: torch.Tensor) -> torch.Tensor:
    """The statistics of one tensor as a ``RECORD_LEN`` row on its device.

    (The NaN/Inf check here costs a host sync; a watcher's steps do it once for all records.)
    """
    batch = RecordBatch()
    batch.add(x)
    row = batch.compute()[0]
    if not bool(torch.isfinite(row[1:3]).all()):
        row = batch.masked_rows([0])[0]
    return row


@dataclass(frozen=True, slots=True)
class HistogramRecord:
    """A record on the host: the numbers of one histogram (finite values only) and the rest.

    Slotted (no per-record dict): a logging step makes one per histogram, hundreds on a large
    model, and each Python object it allocates brings the next garbage collection nearer.
    ``counts`` is a tuple, or a read-only row view of the step's one host array (``from_rows``:
    no Python object per bucket); read it as a sequence (``list(r.counts)``, ``sum(r.counts)``)."""

    numel: int
    nonfinite: float
    min: float
    max: float
    sum: float
    sum_squares: float
    counts: Sequence[float]

    @classmethod
    def from_row(cls, numel: int, row: list[float]) -> HistogramRecord:
        return cls(numel, row[0], row[1], row[2], row[3], row[4], tuple(row[5:]))

    @classmethod
    def from_rows(cls, numels: Sequence[int], rows: np.ndarray) -> list[HistogramRecord]:
        """The records of ``rows`` (``(len(numels), RECORD_LEN)`` float64 on the host) at once: the
        head numbers as Python floats (one ``tolist``), the counts as row views of ``rows``."""
        rows.flags.writeable = False  # the counts are views: nothing may change them afterwards
        columns = rows[:, :5].T.tolist()  # five lists, not one per row
        return list(map(cls, numels, *columns, rows[:, 5:]))

    def count_list(self) -> list[float]:
        """The bucket counts as a list of Python floats (what an event file's proto takes)."""
        counts = self.counts
        return counts.tolist() if isinstance(counts, np.ndarray) else list(counts)

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
    def merge(records: list[HistogramRecord]) -> HistogramRecord:
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
                merged[target] += sum(r.count_list())
                continue
            r_width = (r.max - r.min) / len(r.counts)
            for i, c in enumerate(r.count_list()):
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

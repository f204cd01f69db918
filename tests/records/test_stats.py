"""tensor_record / HistogramRecord against numpy and torch ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from introspect.records.stats import (
    HIST_BINS,
    RECORD_LEN,
    SAMPLE_LIMIT,
    HistogramRecord,
    RecordBatch,
    sample_stride,
    tensor_record,
)


def record(x: torch.Tensor) -> HistogramRecord:
    row = tensor_record(x)
    assert row.shape == (RECORD_LEN,)
    assert row.device == x.device
    return HistogramRecord.from_row(x.numel(), row.tolist())


def histc(values: torch.Tensor, lo: float, hi: float) -> list[float]:
    """torch.histc over [lo, hi]: the last bin is closed, so the maximum lands in it."""
    return torch.histc(values.double(), bins=HIST_BINS, min=lo, max=hi).tolist()


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, int(n**0.5) + 1))


# --------------------------------------------------------------------------- small (exact)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 3, 8, 8),
        lambda: torch.rand(1000) * 7 - 2,
        lambda: torch.randn(SAMPLE_LIMIT),  # the largest exact size
        lambda: torch.arange(64, dtype=torch.float32),  # integer grid: values on bucket edges
        lambda: torch.tensor([0.0, 1.0]),
        lambda: torch.tensor([-3.0, 5.0, 5.0, 5.0]),  # the maximum repeated: last bucket
        lambda: torch.randn(7, 5).double(),
        lambda: torch.randn(4, 6).t(),  # non-contiguous
    ],
    ids=["conv-like", "uniform", "sample-limit", "int-grid", "two-values", "repeated-max", "float64", "transposed"],
)
def test_small_tensor_is_exact(make):
    torch.manual_seed(0)
    x = make()
    r = record(x)
    xd = x.double()
    assert r.numel == x.numel()
    assert r.nonfinite == 0
    assert r.finite_count == x.numel()
    assert r.min == x.min().item()
    assert r.max == x.max().item()
    assert r.sum == pytest.approx(xd.sum().item(), rel=1e-5, abs=1e-4)
    assert r.sum_squares == pytest.approx((xd * xd).sum().item(), rel=1e-5)
    assert len(r.counts) == HIST_BINS
    assert list(r.counts) == histc(x, r.min, r.max)
    assert sum(r.counts) == x.numel()
    expected, _ = np.histogram(x.double().numpy(), bins=HIST_BINS, range=(r.min, r.max))
    assert list(r.counts) == expected.astype(float).tolist()
    assert r.norm == pytest.approx(xd.norm().item(), rel=1e-5)


def test_edges_are_the_right_bucket_limits():
    x = torch.arange(0, 33, dtype=torch.float32)  # 0..32: width 1 per bucket
    r = record(x)
    assert r.edges() == pytest.approx([float(i + 1) for i in range(HIST_BINS)])
    assert r.edges()[-1] == pytest.approx(r.max)
    # 0..31 one per bucket, and 32 (the maximum) joins the last bucket.
    assert list(r.counts) == [1.0] * 31 + [2.0]


# --------------------------------------------------------------------------- large (sampled)
@pytest.mark.parametrize(
    "shape",
    [(SAMPLE_LIMIT + 1,), (8, 64, 30, 30), (3, 1000, 7), (200_003,)],
    ids=["just-over", "conv-like", "odd", "prime-length"],
)
def test_large_tensor_counts_and_sums(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    r = record(x)
    xd = x.double()
    n = x.numel()
    assert r.nonfinite == 0
    assert r.min == x.min().item()  # exact even when the buckets are sampled
    assert r.max == x.max().item()
    assert r.sum == pytest.approx(xd.sum().item(), rel=1e-4, abs=1e-2)
    assert r.sum_squares == pytest.approx((xd * xd).sum().item(), rel=1e-5)
    assert sum(r.counts) == pytest.approx(n, rel=1e-9)
    assert all(c >= 0 for c in r.counts)
    # The sampled histogram has the shape of the real one.
    real = np.array(histc(x, r.min, r.max)) / n
    got = np.array(r.counts) / n
    assert np.abs(real - got).sum() < 0.05


def test_sample_walks_across_channels():
    """A tensor whose channels hold different constants: a stride that divides the channel size would
    see only some channels. Every channel is 1/64 of the values; every bucket holds two channels."""
    channels = torch.arange(64, dtype=torch.float32).view(64, 1, 1)
    x = channels.expand(64, 32, 32).contiguous()  # 65,536 values, sampled
    assert sample_stride(x.shape) > 1
    r = record(x)
    expected = x.numel() / HIST_BINS
    for c in r.counts:
        assert c == pytest.approx(expected, rel=0.2)


@pytest.mark.parametrize(
    "shape", [(10,), (SAMPLE_LIMIT,), (SAMPLE_LIMIT + 1,), (4, 64, 64), (2, 64, 32, 32), (1_000_000,)]
)
def test_sample_stride(shape):
    s = sample_stride(shape)
    n = math.prod(shape)
    if n <= SAMPLE_LIMIT:
        assert s == 1
        return
    assert _is_prime(s)
    assert math.ceil(n / s) <= SAMPLE_LIMIT
    p = 1
    for dim in reversed(shape[1:]):
        p *= dim
        assert p % s != 0


# --------------------------------------------------------------------------- NaN / Inf
def test_small_tensor_with_nan_and_inf():
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 3.0, float("-inf"), 0.5, float("nan")])
    r = record(x)
    finite = x[torch.isfinite(x)]
    assert r.nonfinite == 4
    assert r.finite_count == 4
    assert r.min == -2.0
    assert r.max == 3.0
    assert r.sum == pytest.approx(2.5)
    assert r.sum_squares == pytest.approx(1 + 4 + 9 + 0.25)
    assert list(r.counts) == histc(finite, -2.0, 3.0)
    assert sum(r.counts) == 4
    assert math.isnan(r.norm)  # the norm of a tensor holding NaN/Inf is not a number


def test_all_nonfinite_tensor():
    x = torch.full((5, 5), float("nan"))
    x[0, 0] = float("inf")
    r = record(x)
    assert r.nonfinite == 25
    assert r.finite_count == 0
    assert sum(r.counts) == 0


def test_large_tensor_with_nan():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 20, 20)  # 102,400 values, sampled
    x[1, 3] = float("nan")  # 400 NaN in one channel
    x[2, 5, 0, 0] = float("inf")
    r = record(x)
    assert r.nonfinite >= 1  # estimated from the sample, but never reported clean
    assert math.isfinite(r.min) and math.isfinite(r.max)
    finite = x[torch.isfinite(x)]
    assert finite.min().item() <= r.min <= r.max <= finite.max().item()
    assert r.finite_count + r.nonfinite == pytest.approx(x.numel())
    assert sum(r.counts) == pytest.approx(r.finite_count, rel=1e-9)
    assert r.nonfinite == pytest.approx(401, rel=0.5)


def test_large_tensor_with_a_single_nan_is_not_clean():
    x = torch.randn(100_000)
    x[12_345] = float("nan")  # most likely not on the sample grid
    r = record(x)
    assert r.nonfinite >= 1


# --------------------------------------------------------------------------- constants
@pytest.mark.parametrize("n", [1, 7, SAMPLE_LIMIT * 3], ids=["one", "small", "large"])
@pytest.mark.parametrize("value", [0.0, -2.5, 1e30])
def test_constant_tensor(n, value):
    x = torch.full((n,), value)
    r = record(x)
    assert r.min == r.max == pytest.approx(value)
    assert r.nonfinite == 0
    assert sum(r.counts) == pytest.approx(n)
    assert r.sum == pytest.approx(value * n, rel=1e-5)


# --------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 50_000], ids=["exact", "sampled"])
def test_half_precision_input(dtype, n):
    torch.manual_seed(0)
    x = (torch.randn(n) * 4).to(dtype)
    r = record(x)
    xf = x.float()
    assert r.min == xf.min().item()
    assert r.max == xf.max().item()
    assert r.sum == pytest.approx(xf.double().sum().item(), rel=1e-4, abs=1e-1)
    assert sum(r.counts) == pytest.approx(n)
    if n <= SAMPLE_LIMIT:
        assert list(r.counts) == histc(xf, r.min, r.max)


def test_half_precision_overflowing_sum_is_still_exact():
    """fp16 tops out at 65504: the record must not add up in fp16."""
    x = torch.full((1000,), 1000.0, dtype=torch.float16)
    x[0] = 0.0
    r = record(x)
    assert r.sum == pytest.approx(999_000.0)
    assert r.nonfinite == 0


def test_requires_grad_and_no_autograd_trace():
    x = torch.randn(10, requires_grad=True)
    row = tensor_record(x * 2)
    assert not row.requires_grad


def test_record_is_float64():
    assert tensor_record(torch.randn(5)).dtype == torch.float64
    assert tensor_record(torch.randn(50_000, dtype=torch.float16)).dtype == torch.float64


# --------------------------------------------------------------------------- merge
def test_merge_preserves_count_min_max_and_sums():
    torch.manual_seed(0)
    a = torch.randn(500) - 1
    b = torch.rand(300) * 10
    c = torch.full((20,), 4.0)  # a constant call
    ra, rb, rc = record(a), record(b), record(c)
    m = HistogramRecord.merge([ra, rb, rc])
    both = torch.cat([a, b, c]).double()
    assert m.numel == 820
    assert m.nonfinite == 0
    assert m.min == min(ra.min, rb.min)
    assert m.max == max(ra.max, rb.max)
    assert sum(m.counts) == pytest.approx(820)
    assert len(m.counts) == HIST_BINS
    assert all(x >= 0 for x in m.counts)
    assert m.sum == pytest.approx(both.sum().item(), rel=1e-5)
    assert m.sum_squares == pytest.approx((both * both).sum().item(), rel=1e-5)


def test_merge_of_same_range_records_is_exact():
    torch.manual_seed(0)
    a, b = torch.randn(400), torch.randn(600)
    lo, hi = -5.0, 5.0
    a[0], a[1], b[0], b[1] = lo, hi, lo, hi
    m = HistogramRecord.merge([record(a), record(b)])
    whole = record(torch.cat([a, b]))
    assert m.min == whole.min and m.max == whole.max
    assert list(m.counts) == pytest.approx(list(whole.counts), abs=1e-9)


def test_merge_is_close_to_the_histogram_of_everything():
    torch.manual_seed(0)
    a, b = torch.randn(3000), torch.randn(2000) * 2 + 3
    m = HistogramRecord.merge([record(a), record(b)])
    whole = record(torch.cat([a, b]))
    real = np.array(whole.counts) / 5000
    got = np.array(m.counts) / 5000
    assert np.abs(real - got).sum() < 0.1


def test_merge_with_nonfinite_and_empty_records():
    good = record(torch.tensor([1.0, 2.0, 3.0]))
    bad = record(torch.tensor([float("nan"), 10.0]))
    empty = record(torch.full((4,), float("nan")))
    m = HistogramRecord.merge([good, bad, empty])
    assert m.numel == 9
    assert m.nonfinite == 5
    assert m.finite_count == 4
    assert m.min == 1.0
    assert m.max == 10.0  # the all-NaN record's inf/-inf range is ignored
    assert sum(m.counts) == pytest.approx(4)
    assert m.sum == pytest.approx(16.0)


def test_merge_of_one_is_itself():
    r = record(torch.randn(10))
    assert HistogramRecord.merge([r]) is r


def test_from_row():
    row = [2.0, -1.0, 3.0, 4.0, 10.0] + [1.0] * HIST_BINS
    r = HistogramRecord.from_row(40, row)
    assert (r.numel, r.nonfinite, r.min, r.max, r.sum, r.sum_squares) == (40, 2.0, -1.0, 3.0, 4.0, 10.0)
    assert r.counts == (1.0,) * HIST_BINS
    assert r.finite_count == 38
    assert math.isnan(r.norm)


# --------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1000, 100_000], ids=["exact", "sampled"])
def test_record_on_cuda_matches_cpu(n):
    torch.manual_seed(0)
    x = torch.randint(-50, 50, (n,)).float()  # integers: no value near a bucket edge
    cpu, gpu = record(x), record(x.cuda())
    assert (gpu.min, gpu.max, gpu.nonfinite) == (cpu.min, cpu.max, cpu.nonfinite)
    assert gpu.sum == pytest.approx(cpu.sum, abs=1e-3)
    assert list(gpu.counts) == pytest.approx(list(cpu.counts))


# --------------------------------------------------------------------------- many records at once
def test_batch_of_mixed_sizes_matches_one_record_each():
    """Small tensors get their stats from compute()'s segment reductions, larger ones from their
    own passes; in one batch, every row is what the tensor alone would give, in the order added."""
    from introspect.records.stats import BATCHED_LIMIT, RecordBatch

    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(BATCHED_LIMIT + 5, generator=g),  # own passes, exact bins
        torch.randn(16, 16, generator=g) * 3,  # batched
        torch.randn(4 * SAMPLE_LIMIT, generator=g) + 2,  # sampled
        torch.randn(7, 5, generator=g).double(),  # float64: own passes
        torch.tensor([1.5]),  # batched, one value
        torch.randn(BATCHED_LIMIT, generator=g).half(),  # batched, the largest batched size
        torch.randn(3, 9, generator=g).t(),  # batched, non-contiguous
    ]
    batch = RecordBatch()
    for i, x in enumerate(tensors):
        # A sum handed in (the non-finite check's) is used as is.
        assert batch.add(x, x.sum(dtype=torch.float32) if i == 2 else None) == i
    rows = batch.compute()
    for x, row in zip(tensors, rows):
        alone = tensor_record(x)
        assert torch.allclose(row, alone, rtol=1e-6, atol=1e-5), (x.shape, row[:5], alone[:5])
        r = HistogramRecord.from_row(x.numel(), row.tolist())
        assert (r.min, r.max) == (x.double().min().item(), x.double().max().item())
        assert r.sum_squares == pytest.approx((x.double() ** 2).sum().item(), rel=1e-5)


def test_batch_with_nan_in_a_small_tensor():
    from introspect.records.stats import RecordBatch

    batch = RecordBatch()
    batch.add(torch.randn(10_000))
    batch.add(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    batch.add(torch.tensor([2.0, 4.0]))
    rows = batch.compute()
    assert not math.isfinite(rows[1, 2].item())  # a non-finite range: to be redone
    assert torch.isfinite(rows[[0, 2]]).all()
    fixed = HistogramRecord.from_row(4, batch.masked_rows([1])[0].tolist())
    assert (fixed.nonfinite, fixed.min, fixed.max, fixed.sum) == (2.0, 1.0, 3.0, 4.0)


# --------------------------------------------------------------------------- packed (held) records
def _to_host_rows(batch: RecordBatch) -> list[list[float]]:
    """What StepBuffer.to_host makes of a batch: the rows, NaN/Inf rows redone from finite values."""
    rows = batch.compute().cpu().tolist()
    broken = [i for i, row in enumerate(rows) if not all(math.isfinite(v) for v in row[1:3])]
    if broken:
        for i, row in zip(broken, batch.masked_rows(broken).cpu().tolist()):
            rows[i] = row
    return rows


def _assert_rows_of_each_alone(tensors: list[torch.Tensor], rows: list[list[float]], tolerance: float) -> None:
    """Each row is what its tensor alone would give (a batch of one)."""
    for t, row in zip(tensors, rows, strict=True):
        alone = RecordBatch()
        alone.add(t)
        (expected,) = _to_host_rows(alone)
        assert row == pytest.approx(expected, rel=tolerance, abs=tolerance, nan_ok=True), (t.shape, t.dtype)


def _assorted_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with_nan = torch.randn(7, 9, generator=g)
    with_nan[2, 3] = float("nan")
    with_inf = torch.randn(300, generator=g)
    with_inf[5], with_inf[9] = float("inf"), float("-inf")
    return [
        torch.randn(32, 32, generator=g),
        torch.randn(64, generator=g) * 1e3,
        with_nan,
        with_inf,
        torch.full((5, 5), float("nan")),
        torch.zeros(17),
        torch.full((3, 4), 2.5),
        torch.empty(0),
        torch.randint(-5, 6, (40,), generator=g),  # an int tensor (recorded as float)
        torch.randn(128, 16, generator=g).bfloat16(),
        torch.randn(4, 3, 3, generator=g).half(),
        torch.relu(torch.randn(2000, generator=g)),
        torch.randn(1, generator=g),
        torch.randn(100, 100, generator=g),  # above BATCHED_LIMIT: reduced alone, sampled bins exact
    ]


def test_packed_records_equal_per_tensor_records():
    """Records held by reference and copied in one flush equal those of each tensor alone."""
    tensors = _assorted_tensors()
    packed = RecordBatch()
    for t in tensors:
        packed.add(t, hold=True)
    assert len(packed._held) == len(tensors) - 1  # all but the large one wait for the flush
    rows = _to_host_rows(packed)
    _assert_rows_of_each_alone(tensors, rows, tolerance=1e-6)
    for t, row in zip(tensors, rows):
        if t.numel() == 0:
            continue
        values = t.double().flatten()
        finite = values[torch.isfinite(values)]
        assert row[0] == values.numel() - finite.numel()  # non-finite count
        if finite.numel():
            assert (row[1], row[2]) == (finite.min().item(), finite.max().item())
            assert row[3] == pytest.approx(finite.sum().item(), rel=1e-5, abs=1e-4)
            assert row[4] == pytest.approx(finite.square().sum().item(), rel=1e-5)
            assert sum(row[5:]) == pytest.approx(finite.numel())
            zeros = HistogramRecord.from_row(t.numel(), row)
            assert zeros.finite_count == finite.numel()


def test_a_held_tensor_changed_in_place_is_reported():
    """flush() says which held (or watched) tensors changed in place since add(): the watch copies
    their kind from then on."""
    a, b, c = torch.randn(10), torch.randn(10), torch.randn(10)
    batch = RecordBatch()
    batch.add(a, hold=True)
    batch.add(b, hold=True)
    batch.add(c, watch=True)
    b.relu_()
    c.mul_(2)
    batch.flush()
    assert sorted(batch.changed) == [1, 2]
    rows = _to_host_rows(batch)
    assert rows[2][1:3] == [c.min().item() / 2, c.max().item() / 2]  # the copy made at add()


def test_blocks_of_a_stack_equal_per_tensor_records():
    """A logging step of a deep stack: many tensors of a few shapes, held and flushed in two
    rounds (one stacked block per shape and round), copied ones of the same lengths in between,
    and large sampled ones of one length (their block is binned only): every row is what the
    tensor alone would give."""
    g = torch.Generator().manual_seed(5)
    batch = RecordBatch()
    tensors: list[torch.Tensor] = []

    def add(t: torch.Tensor, hold: bool) -> None:
        tensors.append(t)
        batch.add(t, hold=hold)

    for _ in range(12):
        add(torch.randn(8, 16, generator=g), hold=True)
        add(torch.randn(16, generator=g), hold=True)
    add(torch.randn(128, generator=g), hold=False)  # a copy of a length the blocks have
    add(torch.randn(128, generator=g).double() * 7, hold=False)  # float64: its own exact stats, same length
    batch.flush()
    for i in range(12):
        add(torch.randn(16, 8, generator=g) * (i + 1), hold=True)  # same length, other shape
        add(torch.randn(3 * SAMPLE_LIMIT, generator=g) + i, hold=False)  # sampled: binned only
    with_nan = torch.randn(8, 16, generator=g)
    with_nan[1, 2] = float("nan")
    add(with_nan, hold=True)
    _assert_rows_of_each_alone(tensors, _to_host_rows(batch), tolerance=1e-5)


def test_buckets_computed_in_their_own_int32_memory():
    """_bucket_into casts the float positions to int32 in the same memory: the same buckets as
    the plain two-buffer way, on sizes that take the vectorised and the threaded loops."""
    from introspect.records.stats import _bucket_into, _bucket_position

    g = torch.Generator().manual_seed(1)
    for rows, k in ((3, 5), (64, 2048), (40, 100_003)):
        block = torch.randn(rows, k, generator=g) * 10
        block[0, 0] = float("nan")
        lo, hi = block.nan_to_num(0).amin(dim=1, keepdim=True), block.nan_to_num(0).amax(dim=1, keepdim=True)
        offset, scale = lo, HIST_BINS / (hi - lo)
        expected = _bucket_position(block, offset, scale).to(torch.int32)
        bucket = torch.empty(rows, k, dtype=torch.int32)
        _bucket_into(bucket, block, offset, scale)
        assert torch.equal(bucket, expected)
        assert int(bucket.min()) >= 0 and int(bucket.max()) <= HIST_BINS - 1

"""watch() under sharded training (FSDP2's fully_shard, DTensor parameters): 2 real gloo ranks on
CPU, started the way the DDP tests start them (see tests/runtime/test_distributed.py).

The reference for every histogram is the exact full tensor each rank gathers itself
(``full_tensor()``) in the same run: what an unsharded run would see.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from introspect.runtime.selection import clean_name
from tests.support.events import hist_at, hist_steps, histogram_tags, read_events, scalar_at, text_of
from tests.support.torchrun import FSDP_WORKER, needs_gloo, run_worker


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _has_fsdp2(), reason="needs torch.distributed.fsdp.fully_shard (FSDP2)")
NAMES = ["inp.weight", "inp.bias", "block.fc.weight", "block.fc.bias", "out.weight", "out.bias"]


def run_fsdp(tmp_path: Path, mode: str, every: int = 1, world: int = 2) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_worker(FSDP_WORKER, tmp_path, [mode], [str(every)], world)


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_training_is_untouched_and_shards_are_combined_exactly(tmp_path):
    r0, r1 = run_fsdp(tmp_path / "watched", "watched", every=2)
    p0, p1 = run_fsdp(tmp_path / "plain", "plain")
    # Training: bitwise the same as the unwatched FSDP2 run, on every rank.
    assert r0["final"] == p0["final"] and r1["final"] == p1["final"]
    assert r0["grads"] == p0["grads"] and r0["weights"] == p0["weights"]
    # Clean names, the same on every rank; hooks gone on every rank.
    for r in (r0, r1):
        assert r["module_names"] == ["inp", "block.fc", "block.act", "out"]
        assert r["parameter_names"] == NAMES
        assert r["hooks_after"] == r["hooks_before"]
        assert not r["warnings"], r["warnings"]
    assert r0["writes"] and not r1["writes"]
    acc = read_events(tmp_path / "watched" / "run")
    tags = histogram_tags(acc)
    assert not [t for t in tags if "_wrapped_module" in t]
    assert {f"weights/{n}" for n in NAMES} | {f"grads/{n}" for n in NAMES} <= tags
    # Logging steps only (every=2), although rank 1 writes nothing: it joined at those steps.
    assert hist_steps(acc, "grads/block.fc.weight") == [0, 2, 4]
    assert_full_histograms(acc, r0, (0, 2, 4))
    # out.bias has one value: rank 1's shard of it is empty, and it still joined.
    assert hist_at(acc, "weights/out.bias", 0).num == 1


def assert_full_histograms(acc, result: dict, steps) -> None:
    """weights/ and grads/ on disk are the histograms of the full tensors the worker gathered."""
    for step in steps:
        for kind in ("weights", "grads"):
            assert result[kind][step]
            for raw, (numel, mn, mx, total, *buckets) in result[kind][step].items():
                name = clean_name(raw)
                h = hist_at(acc, f"{kind}/{name}", step)
                assert h.num == numel, (kind, name, step)  # every shard counted, once
                assert (h.min, h.max) == (pytest.approx(mn, abs=0), pytest.approx(mx, abs=0))
                assert h.sum / h.num == pytest.approx(total / numel, rel=1e-5, abs=1e-8)
                if mn < mx:  # tensors up to SAMPLE_LIMIT values are binned exactly
                    assert list(h.bucket) == buckets, (kind, name, step)


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp1_with_orig_params_has_readable_names_and_full_histograms(tmp_path):
    r0, r1 = run_fsdp(tmp_path, "fsdp1")
    for r in (r0, r1):
        assert r["module_names"] == ["inp", "block.fc", "block.act", "out"]  # no _fsdp_wrapped_module.
        assert r["parameter_names"] == NAMES
        assert r["hooks_after"] == r["hooks_before"] and not r["warnings"]
    acc = read_events(tmp_path / "run")
    assert not [t for t in histogram_tags(acc) if "_wrapped_module" in t]
    assert_full_histograms(acc, r0, range(5))  # each rank holds a piece of each flat shard


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp1_flat_parameters_warn_once(tmp_path):
    r0, r1 = run_fsdp(tmp_path, "fsdp1-flat")
    for r in (r0, r1):
        [message] = r["warnings"]
        assert "use_orig_params=True" in message
        assert r["hooks_after"] == r["hooks_before"]
    assert "activations/inp" in histogram_tags(read_events(tmp_path / "run"))


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_nan_on_one_rank_is_named_with_its_rank(tmp_path):
    r0, r1 = run_fsdp(tmp_path, "nan")
    first = [(a["where"], a["step"]) for a in r1["alerts"] if a["kind"] == "nonfinite"][0]
    assert first == ("input", 2)
    message = next(a["message"] for a in r1["alerts"] if a["where"] == "input")
    assert message.startswith("on rank 1: the batch fed to the model already holds NaN/Inf")
    # rank 0's own step 2 was clean: its one finding of step 2 names rank 1 (see the next test)
    assert [(a["kind"], a["where"]) for a in r0["alerts"] if a["step"] == 2] == [("nonfinite_rank", "input")]
    for r in (r0, r1):  # NaN shards are combined like any others
        assert not [m for m in r["warnings"] if "could not be combined" in m]
    # The NaN reached every rank's weights and gradients through the reduced gradients: step 3's
    # non-finite count (weights and gradients of inp.weight) adds up every rank's shard, and
    # training finished on both ranks.
    acc = read_events(tmp_path / "run")
    numel = r0["weights"][3]["inp.weight"][0]
    finite = sum(
        hist_at(acc, f"{kind}/inp.weight", 3).num
        for kind in ("weights", "grads")
        if 3 in hist_steps(acc, f"{kind}/inp.weight")
    )
    assert 0 < scalar_at(acc, "nonfinite/inp.weight", 3) == 2 * numel - finite
    assert len(r0["grads"]) == len(r1["grads"]) == 5


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_nan_made_by_rank_one_is_named_by_every_rank_at_its_step(tmp_path):
    """Rank 1's first Linear makes NaN at step 1; FSDP's reduce-scatter carries it into rank 0's
    gradient shards. Every rank, rank 0 included, says rank 1 made it, where, and at step 1 (not
    only "weights are non-finite" at step 2), as under DDP."""
    r0, r1 = run_fsdp(tmp_path, "nan-linear")
    for r in (r0, r1):
        named = [a for a in r["alerts"] if a["kind"] == "nonfinite_rank"]
        assert len(named) == 1, r["alerts"]
        assert (named[0]["where"], named[0]["step"]) == ("inp", 1)
        assert named[0]["numbers"]["rank"] == 1.0
        assert "first appeared on rank 1" in named[0]["message"] and "FSDP" in named[0]["message"]
        assert not [a for a in r["alerts"] if a["step"] < 1]
    local = [a for a in r1["alerts"] if a["kind"] == "nonfinite"][0]
    assert (local["where"], local["step"]) == ("inp", 1) and local["message"].startswith("on rank 1:")
    assert len(r0["grads"]) == len(r1["grads"]) == 5  # training went on on both ranks


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_fsdp2_watched_on_rank_zero_only_cannot_hang(tmp_path):
    """Only rank 0 calls watch(): its combination waits RANK_WAIT_S once, warns, and stops;
    training goes on and finishes on both ranks."""
    r0, r1 = run_fsdp(tmp_path, "rank0")
    assert len(r0["grads"]) == len(r1["grads"]) == 5
    assert r0["final"] == r1["final"]
    assert len([m for m in r0["warnings"] if "could not be combined" in m]) == 1
    acc = read_events(tmp_path / "run")
    assert "activations/inp" in histogram_tags(acc)
    assert "weights/inp.weight" not in histogram_tags(acc)


@pytest.mark.slow
@needs_gloo
@needs_fsdp2
def test_rank_divergence_names_the_rank_and_the_step(tmp_path):
    """3 ranks (two cannot say which one is wrong): rank 2's input x100 at step 3 stands apart;
    every rank finds it (they all gathered the same vectors); a healthy run finds nothing."""
    results = run_fsdp(tmp_path / "scaled", "scaled", world=3)
    for r in results:
        found = [a for a in r["alerts"] if a["kind"] == "rank_divergence"]
        assert found, r["alerts"]
        assert {(a["numbers"]["rank"], a["step"]) for a in found} == {(2, 3)}
        assert found[0]["where"] == "inp" and found[0]["message"].startswith("rank 2 stands apart")
    texts = "\n".join(text_of(read_events(tmp_path / "scaled" / "run"), "diagnostics/alerts"))
    assert "rank 2 stands apart" in texts
    healthy = run_fsdp(tmp_path / "healthy", "watched", world=3)
    for r in healthy:
        assert not [a for a in r["alerts"] if a["kind"] == "rank_divergence"], r["alerts"]


def test_divergent_ranks_needs_a_strong_deviation_and_three_ranks():
    from introspect.probes.divergence import divergent_ranks

    healthy = torch.tensor([[[1.0, 5.0, 0.0]], [[1.3, 5.5, 0.0]], [[0.8, 4.6, 0.0]], [[1.1, 5.1, 0.0]]])
    assert divergent_ranks(healthy.double()) == []
    scaled = healthy.clone()
    scaled[2, 0, :2] *= 100
    [(rank, module, measure, z)] = divergent_ranks(scaled.double())
    assert (rank, module) == (2, 0) and z > 6
    nan = healthy.clone()
    nan[3, 0, 2] = 7.0
    assert divergent_ranks(nan.double())[0][:3] == (3, 0, "nonfinite")
    # Two ranks cannot say which one is wrong; a rank without the output is not counted.
    assert divergent_ranks(scaled[:2].double()) == []
    missing = scaled.clone()
    missing[0, 0] = math.nan
    missing[1, 0] = math.nan
    assert divergent_ranks(missing.double()) == []

"""watch() under DistributedDataParallel: 2 real processes on CPU with the gloo backend.

Each test starts two ranks the way torchrun does (environment variables, one process per rank)
and reads back their event files and what each rank's watcher found.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from introspect import ConfigError, watch
from introspect.debugger.alerts import Alert
from introspect.runtime.distributed import (
    origin_code,
    rank_origin_alert,
    rank_writer_target,
)
from tests.support import QUIET
from tests.support.events import hist_at, hist_steps, histogram_tags, read_events
from tests.support.torchrun import DDP_WORKER, needs_gloo, run_worker


def run_ranks(
    tmp_path: Path,
    ranks: str,
    on_nonfinite: str = "warn",
    watched: str = "all",
    world: int = 2,
    check_mode: str = "replay",
) -> list[dict]:
    """Run ``world`` ranks of tests/support/ddp_worker.py; their result dicts, by rank."""
    return run_worker(DDP_WORKER, tmp_path, [ranks], [on_nonfinite, watched, check_mode], world)


CHECK_MODES = pytest.mark.parametrize("check_mode", ["replay", "per_module"])


@pytest.mark.slow
@needs_gloo
@CHECK_MODES
def test_ddp_rank_zero_writes_averaged_gradients_and_names_the_nan_rank(tmp_path, check_mode):
    """Both modes name the NaN's rank and module; the per-module check also sees rank 1's NaN in
    an output the model drops (step 4), which reaches neither the output nor a gradient, so the
    sentinel, which looks at those, rightly has nothing to say."""
    r0, r1 = run_ranks(tmp_path, "zero", check_mode=check_mode)
    # Names are the user's own (no "module." from DDP), the same on every rank.
    assert r0["module_names"] == r1["module_names"] == ["lin1", "poison", "side", "lin2"]
    assert r0["writes"] and not r1["writes"]
    run = tmp_path / "run"
    assert not (run / "rank0").exists() and not (run / "rank1").exists()
    acc = read_events(run)
    tags = histogram_tags(acc)
    assert "activations/lin1" in tags and "grads/lin1.weight" in tags
    assert not [t for t in tags if "module." in t]
    # Activations are rank 0's own batch (3 samples x 8 features); rank 1's are 5 x 8.
    assert hist_at(acc, "activations/lin1", 0).num == 3 * 8
    # grads/ is the gradient DDP averaged over both ranks (what optimizer.step() uses), read
    # after the all-reduce: not rank 0's local gradient.
    for step in (0, 1, 3, 5):  # steps whose averaged gradient is finite
        for name, (mn, mx, total) in r0["grads"][step].items():
            h = hist_at(acc, f"grads/{name}", step)
            assert (h.min, h.max) == pytest.approx((mn, mx), rel=1e-6), (step, name)
            assert h.sum == pytest.approx(total, rel=1e-5, abs=1e-7), (step, name)
        assert r0["grads"][step] == r1["grads"][step]  # the averaged gradient is one
    assert hist_steps(acc, "grads/lin1.weight") == [0, 1, 2, 3, 4, 5]

    # Step 2: rank 1's poison made NaN; DDP carried it into rank 0's averaged gradients.
    kinds0 = [(a["kind"], a["where"], a["step"]) for a in r0["alerts"]]
    assert ("nonfinite_rank", "poison", 2) in kinds0
    rank_alert = next(a for a in r0["alerts"] if a["kind"] == "nonfinite_rank")
    assert rank_alert["numbers"]["rank"] == 1
    assert "first appeared on rank 1" in rank_alert["message"]
    assert not [a for a in r0["alerts"] if a["kind"] == "nonfinite"]  # rank 0 made none itself
    # Rank 1 found the origin itself, marked with its rank, and the same rank finding.
    local = [a for a in r1["alerts"] if a["kind"] == "nonfinite"]
    dropped = [("side/1", 4)] if check_mode == "per_module" else []
    assert [(a["where"], a["step"]) for a in local] == [("poison", 2), *dropped]
    assert local[0]["message"].startswith("on rank 1: NaN first appears in the output of poison")
    assert local[0]["numbers"]["rank"] == 1
    assert ("nonfinite_rank", "poison", 2) in [(a["kind"], a["where"], a["step"]) for a in r1["alerts"]]
    # Step 4: a NaN only rank 1 ever sees (its gradient never goes anywhere): rank 1 reports it,
    # rank 0 knows nothing, and neither hangs waiting for the other (the run finished).
    assert not [a for a in r0["alerts"] if a["step"] == 4]
    # The rank finding is on disk, on rank 0.
    assert any("first appeared on rank 1" in t for t in _alert_texts(acc))


def _alert_texts(acc) -> list[str]:
    from tests.support.events import text_of

    return text_of(acc, "diagnostics/alerts")


@pytest.mark.slow
@needs_gloo
def test_ddp_all_ranks_write_their_own_runs(tmp_path):
    r0, r1 = run_ranks(tmp_path, "all")
    assert r0["writes"] and r1["writes"]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["rank0", "rank1"]  # nothing at the top
    for rank, result in enumerate((r0, r1)):
        acc = read_events(run / f"rank{rank}")
        assert hist_at(acc, "activations/lin1", 0).num == (3 + 2 * rank) * 8  # its own batch
        mn, mx, _ = result["grads"][0]["lin1.weight"]
        h = hist_at(acc, "grads/lin1.weight", 0)
        assert (h.min, h.max) == pytest.approx((mn, mx), rel=1e-6)  # the averaged gradient
    # Rank 1's own findings are on disk in its run, with its rank.
    texts = "\n".join(_alert_texts(read_events(run / "rank1")))
    assert "on rank 1: NaN first appears in the output of poison" in texts


@pytest.mark.slow
@needs_gloo
@CHECK_MODES
def test_ddp_raise_stops_every_rank_together(tmp_path, check_mode):
    """on_nonfinite="raise": a NaN that DDP spreads raises on every rank at the same backward
    (after the all-reduce), so no rank is left waiting in the next collective."""
    r0, r1 = run_ranks(tmp_path, "zero", on_nonfinite="raise", check_mode=check_mode)
    assert r0["raised"][:1] == [2] and r1["raised"][:1] == [2]
    # Rank 1's NaN at step 4 never left rank 1 (nor reached its output): only rank 1's per-module
    # check raises there.
    assert 4 not in r0["raised"]
    assert (4 in r1["raised"]) == (check_mode == "per_module")


@pytest.mark.slow
@needs_gloo
def test_ddp_watched_on_rank_zero_only_cannot_hang(tmp_path):
    """watch() on rank 0 alone: the NaN rank-1 made reaches rank 0's averaged gradients; rank 0
    asks, hears nothing from rank 1 within RANK_WAIT_S, says so, and training goes on."""
    r0, r1 = run_ranks(tmp_path, "zero", watched="0")
    assert r0["writes"] and not r1["alerts"]
    [alert] = [a for a in r0["alerts"] if a["kind"] == "nonfinite_rank"]
    assert (alert["where"], alert["step"]) == ("gradients", 2)
    assert "no word from rank [1] (not watched there?)" in alert["message"]
    assert len(r0["grads"]) == 6  # all six steps ran


# --------------------------------------------------------------------------- single process
def test_ranks_option_is_checked(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="ranks must be one of"):
        watch(model, tmp_path / "run", ranks="some")


def test_ranks_all_without_a_process_group_is_a_plain_run(tmp_path):
    model = torch.nn.Linear(2, 2)
    with watch(model, tmp_path / "run", ranks="all", **QUIET):
        model(torch.randn(3, 2)).sum().backward()
    assert hist_steps(read_events(tmp_path / "run"), "activations/model") == [0]
    assert not (tmp_path / "run" / "rank0").exists()
    assert rank_writer_target("x", "all") == "x"


def test_origin_codes_round_trip():
    modules = ["a", "b", "c"]
    forward_b = Alert("nonfinite", "b", 7, "NaN", phase="forward")
    backward_c = Alert("nonfinite", "c/0", 7, "NaN", phase="backward")
    codes = [0, origin_code(forward_b, modules), origin_code(backward_c, modules)]
    alert = rank_origin_alert(7, codes, modules)
    assert (alert.kind, alert.where, alert.numbers["rank"], alert.phase) == ("nonfinite_rank", "b", 1, "forward")
    assert "ranks [2] found one too" in alert.message
    assert rank_origin_alert(7, [0, origin_code(backward_c, modules)], modules).phase == "backward"
    assert rank_origin_alert(7, [origin_code(Alert("nonfinite", "input", 1, "x"), modules)], modules).where == "input"
    nobody = rank_origin_alert(7, [0, 0], modules)
    assert nobody.where == "gradients" and math.isclose(nobody.numbers["ranks"], 0)
    silent = rank_origin_alert(7, [None, origin_code(forward_b, modules), None], modules)
    assert silent.numbers["rank"] == 1 and "no word from ranks [0, 2]" in silent.message

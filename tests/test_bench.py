"""scripts/bench.py's own logic on CPU: its models, options, and the statistics-pass measurement
(the GPU comparison runs the same code with device="cuda")."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    os.environ["INTROSPECT_BENCH_NO_REEXEC"] = "1"  # import it here, never re-executed elsewhere
    spec = importlib.util.spec_from_file_location("_bench_under_test", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_models_train_one_step(bench, name):
    model, x, y, desc = bench.build_model(name, "cpu")
    out = model(x)
    assert out.shape == y.shape
    assert "Adam" in desc


def test_variants_option(bench):
    args = bench.parse_args(["--variants", "watch_every1,wandb_1"])
    assert args.variant_keys == ["bare", "watch_every1", "wandb_1"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "nope"])


def test_stats_pass_vs_bandwidth_on_cpu(bench):
    model, x, y, _ = bench.build_model("mlp", "cpu")
    tensors = bench.logging_step_tensors(model, x, y)
    # 5 module outputs and their gradients, 6 parameters and their gradients
    assert len(tensors) == 22
    assert all(p.grad is None for p in model.parameters())  # the step left no gradients behind
    result = bench.stats_pass_vs_bandwidth(model, x, y, "cpu", reps=2, probe_mb=8)
    assert result["tensors"] == 22
    assert result["bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert result["pass_s"] > 0 and result["bandwidth_bps"] > 0
    assert result["ratio"] == pytest.approx(result["pass_s"] / (result["bytes"] / result["bandwidth_bps"]))
    text = bench.stats_pass_text(result)
    assert "22 tensors" in text and "≤ 3×" in text


def test_model_section_leaves_out_variants_not_run(bench):
    result = {"model": "mlp", "device": "cpu", "variants": {
        "bare": {"status": "ok", "per_step_s": [0.001, 0.001]},
        "watch_every1": {"status": "ok", "per_step_s": [0.002, 0.003]},
        "tb_every1": {"status": "not run"},
    }, "stats_pass": {"tensors": 3, "bytes": 2**20, "pass_s": 0.002, "bandwidth_bps": 1e10,
                      "read_once_s": 1e-4, "ratio": 20.0}}
    text = bench.model_section(result, "cpu")
    assert "watch(every=1" in text and "tutorial" not in text
    assert "20.0× one read" in text and "1.0 MB" in text

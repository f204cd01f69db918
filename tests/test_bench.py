"""The benchmark package's own logic on CPU: its models, options, the statistics-pass measurement,
the fault table (which NaN/Inf detector names which planted fault) and the host-sync column (the
GPU comparison runs the same code with device="cuda")."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks import faults, report, timing, variants
from benchmarks.__main__ import parse_args
from benchmarks.models import GPT2_BATCH, GPT2_SIZE, SCALE_MODELS, build_model, train_loss
from tests.support import REPO_ROOT


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_models_train_one_step(name):
    model, x, y, desc = build_model(name, "cpu")
    out = model(x)
    assert out.shape == y.shape
    assert "Adam" in desc


def test_variants_option():
    args = parse_args(["--variants", "watch_every1,wandb_1"])
    assert args.variant_keys == ["bare", "watch_every1", "wandb_1"]
    with pytest.raises(SystemExit):
        parse_args(["--variants", "nope"])


def test_stats_pass_vs_bandwidth_on_cpu():
    model, x, y, _ = build_model("mlp", "cpu")
    tensors = timing.logging_step_tensors(model, x, y)
    # 5 module outputs and their gradients, 6 parameters and their gradients
    assert len(tensors) == 22
    assert all(p.grad is None for p in model.parameters())  # the step left no gradients behind
    result = timing.stats_pass_vs_bandwidth(model, x, y, "cpu", reps=2, probe_mb=8)
    assert result["tensors"] == 22
    assert result["bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert result["pass_s"] > 0 and result["bandwidth_bps"] > 0
    assert result["ratio"] == pytest.approx(result["pass_s"] / (result["bytes"] / result["bandwidth_bps"]))
    text = report.stats_pass_text(result)
    assert "22 tensors" in text and "≤ 3×" in text


def test_model_section_leaves_out_variants_not_run():
    result = {
        "model": "mlp",
        "device": "cpu",
        "variants": {
            "bare": {"status": "ok", "per_step_s": [0.001, 0.001]},
            "watch_every1": {"status": "ok", "per_step_s": [0.002, 0.003]},
            "tb_every1": {"status": "not run"},
        },
        "stats_pass": {
            "tensors": 3,
            "bytes": 2**20,
            "pass_s": 0.002,
            "bandwidth_bps": 1e10,
            "read_once_s": 1e-4,
            "ratio": 20.0,
        },
    }
    text = report.model_section(result, "cpu")
    assert "watch(every=1" in text and "tutorial" not in text
    assert "20.0× one read" in text and "1.0 MB" in text


@pytest.mark.slow
def test_gpt2_builds_and_steps_under_every_detector_variant(tmp_path):
    model, x, y, desc = build_model("gpt2", "cpu")
    assert y is None and "GPT2Config" in desc and "labels=input_ids" in desc
    assert x.shape == (GPT2_BATCH, GPT2_SIZE["n_positions"])
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    loss = train_loss(model, x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key in ("bare", "detect_anomaly", "isfinite_hooks"):
        runner = variants.Runner(key, model, x, y, "cpu", tmp_path / key)
        try:
            runner.run(1)
        finally:
            runner.close()
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)  # Adam stepped it
    assert not torch.is_anomaly_enabled()  # anomaly mode was on for that variant's step only
    assert all(not m._forward_hooks for m in model.modules())  # the naive hooks are gone


def test_isfinite_hooks_flag_the_first_bad_output():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    hooks = variants.IsfiniteHooks(model)
    hooks.step = 7
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    model(torch.randn(2, 3)).sum().backward()
    assert hooks.first == ("0", "forward", 7)
    hooks.remove()
    assert all(not m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def cnn_faults():
    entries = faults.run_faults(["fault_cnn"], timing.QUICK)
    assert not torch.is_anomaly_enabled()
    return entries[0]


def test_fault_table_forward_nan(cnn_faults):
    cells = cnn_faults["cells"]
    assert "error" not in cnn_faults, cnn_faults.get("error")
    # This project and the naive hooks name the layer and step the NaN was planted at.
    assert (cells["forward_nan/watch"]["named"], cells["forward_nan/watch"]["step"]) == ("conv2", faults.FAULT_STEP)
    assert cells["forward_nan/watch"]["verdict"] == "right"
    assert cells["forward_nan/isfinite_hooks"]["verdict"] == "right"
    # detect_anomaly does not miss a forward NaN: it raises at the first backward function that
    # returns NaN, the loss's, whose forward frame is the loss call, not the layer.
    anomaly = cells["forward_nan/detect_anomaly"]
    assert anomaly["named"] == "BinaryCrossEntropyWithLogitsBackward0"
    assert anomaly["verdict"] == "wrong" and "in binary_cross_entropy_with_logits" in anomaly["said"]
    # A NaN made in backward only is where it shines: the op and its forward line.
    assert cells["backward_nan/detect_anomaly"]["named"] == "SqrtBackward0"
    assert cells["backward_nan/detect_anomaly"]["verdict"] == "right"
    # Code between two modules: this project names both; the naive hooks the next module only.
    assert cells["unwatched/watch"]["between"] == ("fc1", "fc2")
    assert cells["unwatched/watch"]["verdict"] == "right"
    assert (cells["unwatched/isfinite_hooks"]["named"], cells["unwatched/isfinite_hooks"]["verdict"]) == (
        "fc2",
        "wrong",
    )
    assert set(cnn_faults["cost"]) == set(faults.FAULT_DETECTORS)
    assert all(c["source"].startswith("in-line") and c["ratio"] > 0 for c in cnn_faults["cost"].values())


def test_fault_section_markdown(cnn_faults):
    text = faults.faults_section([cnn_faults])
    assert (
        "| forward NaN: a layer's output times NaN | `conv2` (forward) | `conv2` (forward), step 3: **right** |" in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(faults.FAULTS) + 1  # header, one row per fault, the cost row
    assert rows[-1].startswith("| cost per step") and "in-line" in rows[-1]
    # With timing results, the cost comes from the timing table instead, and is cited as such.
    timings = [
        {
            "model": "fault_cnn",
            "variants": {
                k: {"status": "ok", "per_step_s": [t]}
                for k, t in (
                    ("bare", 0.01),
                    ("watch_default", 0.011),
                    ("detect_anomaly", 0.03),
                    ("isfinite_hooks", 0.02),
                )
            },
        }
    ]
    cost = faults.fault_costs("fault_cnn", timing.QUICK, timing.timed_rows(timings[0]), None)
    assert {d: (round(c["ratio"], 2), c["source"]) for d, c in cost.items()} == {
        "watch": (1.1, "timing table"),
        "detect_anomaly": (3.0, "timing table"),
        "isfinite_hooks": (2.0, "timing table"),
    }
    assert '| this project: watch(on_nonfinite="warn") | 1.10× |' in faults.faults_section([cnn_faults], timings)


def test_host_sync_classification_and_column():
    assert [variants.logs_at("watch_default", 50)(s) for s in (0, 1, 50)] == [True, False, True]
    assert [variants.logs_at("wandb_100", 100)(s) for s in (0, 99)] == [False, True]
    assert not any(variants.logs_at("watch_check", None)(s) for s in range(5))
    result = {
        "model": "mlp",
        "device": "cuda",
        "variants": {
            "bare": {"status": "ok", "per_step_s": [0.001], "syncs": {"off": 0, "logging": None}},
            "watch_default": {"status": "ok", "per_step_s": [0.002], "syncs": {"off": 1, "logging": 4}},
        },
    }
    cuda = report.model_section(result, "cuda")
    assert "host syncs per step (off-cadence / logging)" in cuda and "| 1 / 4 |" in cuda and "| 0 / — |" in cuda
    assert "host syncs" not in report.model_section(dict(result, device="cpu"), "cpu")


def _bench_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )


def test_faults_and_skip_faults_exclude_each_other():
    proc = _bench_cli("--faults", "--skip-faults")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_faults_cli_quick(tmp_path):
    proc = _bench_cli(
        "--faults",
        "--quick",
        "--models",
        "gpt2",
        "--fault-models",
        "cnn",
        "--fault-kinds",
        "forward_nan",
        "--out",
        str(tmp_path / "faults.md"),
        "--json",
        str(tmp_path / "faults.json"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "faults.md").read_text()
    assert text.startswith("# Fault table") and "### gpt2" in text and "### fault_cnn" in text
    # The fault table of issue 25, restricted to one model and fault: both cadences and 60 healthy steps.
    assert "| cnn | forward NaN: a layer's output × NaN, one step | `blocks.1.0` | ✓ +0 #1 (" in text
    assert "Healthy runs (60 steps, no fault)" in text
    import json

    numbers = json.loads((tmp_path / "faults.json").read_text())
    assert [(c["model"], c["fault"], c["every"]) for c in numbers["cells"]] == [
        ("cnn", "forward_nan", 50),
        ("cnn", "forward_nan", 1),
    ]
    assert {d["model"] for d in numbers["detectors"]} == {"fault_cnn", "gpt2"}
    assert (
        "| forward NaN: a layer's output times NaN | `transformer.h.1.mlp.c_fc` (forward) | "
        "`transformer.h.1.mlp.c_fc` (forward), step 3: **right** |"
    ) in text
    assert "`LogSoftmaxBackward0`, step 3" in text  # detect_anomaly on GPT-2's forward NaN: the loss
    assert not list(tmp_path.glob("*.png"))  # no timing, no plot


@pytest.mark.slow
def test_quick_run_with_the_detector_variants(tmp_path):
    out = tmp_path / "bench.md"
    proc = _bench_cli(
        "--quick",
        "--models",
        "mlp",
        "--variants",
        "watch_default,detect_anomaly,isfinite_hooks",
        "--skip-faults",
        "--rounds",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for key in ("detect_anomaly", "isfinite_hooks"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {variants.VARIANTS[key].label} |"))
        assert "error" not in row and "×" in row
    assert "Which detector finds which fault" not in text and (tmp_path / "bench.png").exists()


def test_a_rerun_keeps_the_hand_written_head_of_the_report(tmp_path):
    """docs/benchmarks.md opens with prose the README links to; scripts/bench rewrites only what is below
    the marker, and writes the whole file when there is none."""
    from benchmarks.report import GENERATED_BELOW, write_report_file

    out = tmp_path / "benchmarks.md"
    write_report_file(out, "first run")
    assert out.read_text() == "first run\n"
    out.write_text(f"# Costs\n\nprose\n\n{GENERATED_BELOW}\n\nold table\n")
    write_report_file(out, "new table")
    assert out.read_text() == f"# Costs\n\nprose\n\n{GENERATED_BELOW}\n\nnew table\n"


# --------------------------------------------------------------------------- the fault table (issue 25)
@pytest.fixture(scope="module")
def nan_table():
    """Two real cells of the fault table: a forward NaN in the CNN at both cadences."""
    from benchmarks import fault_table

    return fault_table.run_fault_table(["cnn"], ["forward_nan"], healthy_steps=0)


def test_fault_table_names_a_forward_nan_at_its_layer(nan_table):
    from benchmarks import fault_table

    cells = {c["every"]: c for c in nan_table["cells"]}
    assert set(cells) == set(fault_table.CADENCES)
    for every, cell in cells.items():
        cadence = fault_table.CADENCES[every]
        assert "error" not in cell, cell.get("error")
        assert cell["steps"] == cadence.last_step + 1 and cell["fault_step"] == cadence.fault_step
        assert cell["expected"]["modules"] == ["blocks.1.0"]
        # The sentinel checks every step: the NaN is named at the planted conv, at its step, first.
        assert cell["right"] and cell["latency"] == 0 and cell["rank"] == 1, cell
        assert cell["right_said"].startswith("nonfinite (forward) `blocks.1.0`")
        assert cell["findings"] >= 1 and cell["early"] == 0


def test_fault_table_markdown_and_files(nan_table, tmp_path):
    from benchmarks import fault_table

    text = fault_table.fault_table_markdown(nan_table)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| model | fault | planted at | every=50 | every=1 |"
    assert rows[1].startswith("| cnn | forward NaN: a layer's output × NaN, one step | `blocks.1.0` | ✓ +0 #1 (")
    assert len(rows) == 2 and "Cells that miss the Must show of issue 25 (default cadence): 0." in text
    # docs/benchmarks.md holds markers: only the text between them is rewritten, dated.
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# head\n\n{fault_table.FAULT_TABLE_BEGIN}\nPREVIOUS TABLE\n{fault_table.FAULT_TABLE_END}\n\ntail\n"
    )
    json_out = tmp_path / "table.json"
    fault_table.write_fault_table(nan_table, fault_table.dated(text, "a test machine"), doc, json_out)
    written = doc.read_text()
    assert written.startswith("# head\n\n") and written.endswith(f"{fault_table.FAULT_TABLE_END}\n\ntail\n")
    assert "PREVIOUS TABLE" not in written and "## Fault table\n\nRun " in written and "on a test machine." in written
    import json

    assert json.loads(json_out.read_text())["cells"][0]["right_said"] == nan_table["cells"][0]["right_said"]


def test_fault_table_counts_escalations(nan_table):
    """Each run counts the cheap signals' escalations, granted and skipped (their time budget):
    the cells in their JSON, the healthy runs in their row."""
    from benchmarks import fault_table

    for cell in nan_table["cells"]:
        granted, skipped = cell["escalations"]
        assert granted >= 0 and skipped >= 0
    healthy = {"model": "cnn", "every": 50, "steps": 300, "false_findings": 0, "said": [], "kinds": []}
    table = dict(nan_table, healthy=[dict(healthy, escalations=2, escalations_skipped=1)], healthy_steps=300)
    text = fault_table.fault_table_markdown(table)
    assert "| model | every | false findings | escalations (granted / skipped) | kinds (first few said) |" in text
    assert "| cnn | 50 | 0 | 2 / 1 | — |" in text


def test_fault_table_rank_follows_alert_cause():
    """Where findings carry ``cause`` (issue 25's linking), only roots rank; a right finding that
    hangs under another one is "attached", not first."""
    from dataclasses import dataclass

    from benchmarks.fault_table import judge, must_show
    from introspect import Alert

    @dataclass(frozen=True)
    class Linked(Alert):
        cause: Alert | None = None

    spike = Linked("grad_norm_spike", "model", 111, "spike")
    dead = Linked("dead_units", "blocks.1.2", 112, "dead", cause=spike)
    early = Linked("vanishing_gradient", "fc1", 50, "early")
    cell = judge([early, spike, dead], "dead_layer", {"blocks.1.1", "blocks.1.2"}, 110)
    assert (cell["right"], cell["latency"], cell["rank"], cell["attached"]) == (True, 2, None, True)
    assert (cell["findings"], cell["roots"], cell["early"]) == (3, 2, 1)
    root = judge([early, spike, Linked("dead_units", "blocks.1.2", 112, "dead")], "dead_layer", {"blocks.1.2"}, 110)
    assert (root["rank"], root["attached"]) == (3, False)  # behind the early false finding and the spike
    table = {"cells": [dict(cell, model="cnn", fault="dead_layer", every=50)], "healthy": []}
    assert must_show(table) == ["cnn / dead_layer (every=50): root cause attached to another finding"]


def test_the_scale_axis_options():
    args = parse_args(["--scale"])
    assert args.models.split(",") == SCALE_MODELS == ["mlp51", "mlp201", "mlp801", "llama8"]
    assert args.variant_keys == variants.SCALE_VARIANTS and args.rounds >= 7 and args.skip_faults
    assert "mlp801" not in parse_args([]).models.split(",")  # the default run is unchanged
    with pytest.raises(SystemExit):
        parse_args(["--scale", "--faults"])


@pytest.mark.parametrize("name, modules", [("mlp51", 51), ("mlp801", 801)])
def test_scale_models_have_their_module_count(name, modules):
    model, x, y, desc = build_model(name, "cpu")
    assert len(list(model.modules())) == modules and f"{modules} modules" in desc
    assert model(x).shape == y.shape


def test_a_smoke_of_the_scale_axis_fills_its_table(tmp_path):
    """Two rounds of two-step chunks on the 51-module MLP: every column of the scale table, a
    logging step's cost per module for the variants that log, none for those that never do."""
    base, x, y, desc = build_model("mlp51", "cpu")
    keys = ["bare", "watch_every1", "watch_hooks", "detect_anomaly"]
    runners = {k: variants.Runner(k, copy.deepcopy(base), x, y, "cpu", tmp_path / k) for k in keys}
    measured: dict = {k: {"status": "ok"} for k in keys}
    try:
        timing.interleave(runners, measured, {k: 2 for k in keys}, rounds=2, warmup=1, schedule=timing.QUICK)
    finally:
        variants.close_runners(runners.values(), finish_watch=False)
    result = {"model": "mlp51", "device": "cpu", "desc": desc, "modules": 51, "scale": True, "variants": measured}
    text = report.model_section(result, "cpu")
    assert report.SCALE_HEAD in text and "51 modules" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    every1 = rows[variants.VARIANTS["watch_every1"].label]
    assert len(every1) == 6 and every1[4].endswith("a bare step)") and every1[5].endswith("µs |")
    assert rows[variants.VARIANTS["detect_anomaly"].label][4:] == ["—", "— |"]  # it never logs
    assert rows[variants.VARIANTS["bare"].label][2] == "1.00×"

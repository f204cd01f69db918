"""Golden runs, in torchinfo's manner: what a user sees, checked in and compared.

Each scenario trains a seeded model for a few steps under ``watch`` into a fresh log directory,
reads every event file back with ``EventAccumulator`` and compares a snapshot of it with
``tests/golden/<scenario>.json``:

* per run directory, every tag of every kind (scalars, histograms, images, text/tensors) with the
  list of steps it was written at (so a cadence change shows), and whether a graph exists;
* the HPARAMS records: hyperparameter names, metric tags, the session's end status;
* ``w.alerts``: kind, where, step, phase, module type, the names of its numbers, its cause (kind,
  where, step of the root it follows from) and its message with every number replaced by ``#``
  (numbers are floats of a training run: exact on one machine, not across BLAS builds; the words
  are what a refactor must keep);
* what the run printed (the torchinfo summary) and ``w.step`` at the end.

    pytest tests/live/test_golden.py                    # compare
    pytest tests/live/test_golden.py --update-golden    # rewrite the files from the current code

A missing golden file is a failure, not a pass: generate it, read the diff, commit it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.broken_training import DeepTanhNet, batches, mlp, regression_data
from examples.models import SeedCNN
from introspect import watch
from tests.support import GOLDEN, QUIET, REPO_ROOT
from tests.support.events import read_events
from tests.support.hparams_records import hparam_values, hparams_records, metric_tags, status_name
from tests.support.training import make_optimizer, train
from tests.support.zoo import ZOO, ZOO_IDS, ZooCase, seed_cnn_batch, seed_cnn_loss

STEPS = 5
EVERY = 2  # logging steps 0, 2, 4 (and images at 0: image_every defaults to 10 x every)
KINDS = ("scalars", "histograms", "images", "tensors")
# A number in a message, not a digit inside a name ("act2", "L2Normalize", "layer4.1.bn2").
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


# --------------------------------------------------------------------------- snapshots
def run_snapshot(logdir: Path) -> dict[str, Any]:
    """One run directory's tags (with their steps), graph flag and HPARAMS records."""
    acc = read_events(logdir)
    tags = acc.Tags()
    readers = {"scalars": acc.Scalars, "histograms": acc.Histograms, "images": acc.Images, "tensors": acc.Tensors}
    snap: dict[str, Any] = {kind: {t: [e.step for e in readers[kind](t)] for t in sorted(tags[kind])} for kind in KINDS}
    snap["graph"] = bool(tags["graph"])
    records = hparams_records(logdir)
    snap["hparams"] = {
        "start": sorted(hparam_values(records["start"])) if records["start"] is not None else None,
        "metrics": sorted(metric_tags(records["experiment"])) if records["experiment"] is not None else None,
        "end": status_name(records["end"]) if records["end"] is not None else None,
    }
    return snap


def alert_snapshot(alert: Any) -> dict[str, Any]:
    return {
        "step": alert.step,
        "kind": alert.kind,
        "where": alert.where,
        "phase": alert.phase,
        "module_type": alert.module_type,
        "numbers": sorted(alert.numbers),
        "message": NUMBER.sub("#", alert.message),
        "cause": None if alert.cause is None else [alert.cause.kind, alert.cause.where, alert.cause.step],
    }


def snapshot(logdir: Path, w: Any, stdout: str) -> dict[str, Any]:
    """Everything a user sees of one watched run, without its floating-point numbers."""
    dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    alerts = sorted((alert_snapshot(a) for a in w.alerts), key=lambda a: (a["step"], a["kind"], a["where"], a["phase"]))
    return {
        "final_step": w.step,
        "runs": {d.relative_to(logdir).as_posix(): run_snapshot(d) for d in dirs},
        "alerts": alerts,
        "stdout": stdout.splitlines(),
    }


# --------------------------------------------------------------------------- readable diffs
def _diff_lines(path: str, expected: Any, actual: Any) -> list[str]:
    """Where ``actual`` differs from ``expected``, one line per added/missing/changed entry."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines = [f"  missing {path}/{k}" for k in sorted(expected.keys() - actual.keys())]
        lines += [f"  added   {path}/{k}: {actual[k]!r:.200}" for k in sorted(actual.keys() - expected.keys())]
        for k in sorted(expected.keys() & actual.keys()):
            lines += _diff_lines(f"{path}/{k}", expected[k], actual[k])
        return lines
    if path.endswith("/alerts") and isinstance(expected, list) and isinstance(actual, list):
        lines = [f"  missing alert {a}" for a in expected if a not in actual]
        return lines + [f"  added   alert {a}" for a in actual if a not in expected]
    if expected != actual:
        return [f"  changed {path}: expected {expected!r:.300}, got {actual!r:.300}"]
    return []


def check_golden(name: str, actual: dict[str, Any], update: bool) -> None:
    """Compare with (or, with ``--update-golden``, rewrite) ``tests/golden/<name>.json``."""
    path = GOLDEN / f"{name}.json"
    # Through JSON and back, so tuples and lists compare as the file will hold them.
    actual = json.loads(json.dumps(actual))
    if update:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
        return
    if not path.exists():
        pytest.fail(
            f"no golden file {path.relative_to(REPO_ROOT)}; run pytest {Path(__file__).relative_to(REPO_ROOT)} --update-golden"
        )
    expected = json.loads(path.read_text())
    diff = _diff_lines(name, expected, actual)
    assert not diff, f"{name} differs from {path.name} ({len(diff)} differences):\n" + "\n".join(diff[:80])


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


# --------------------------------------------------------------------------- the zoo
@pytest.mark.parametrize("case", ZOO, ids=ZOO_IDS)
def test_zoo_golden(case: ZooCase, tmp_path: Path, capsys: pytest.CaptureFixture, update_golden: bool):
    torch.manual_seed(0)
    model = case.build_model()
    with watch(model, tmp_path / "run", every=EVERY, **QUIET) as w:
        train(model, case.make_input, case.loss_fn, STEPS, make_optimizer(model))
    check_golden(f"zoo_{case.name}", snapshot(tmp_path / "run", w, capsys.readouterr().out), update_golden)


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """A run with its own model, loop and options: ``run(logdir)`` trains and returns the watcher."""

    name: str
    run: Callable[[Path], Any]


def _seed_cnn_run(logdir: Path, **options: Any) -> Any:
    torch.manual_seed(0)
    model = SeedCNN()
    with watch(model, logdir, every=EVERY, **options) as w:
        train(model, seed_cnn_batch, seed_cnn_loss, STEPS, make_optimizer(model))
    return w


def summary_and_graph(logdir: Path) -> Any:
    """The defaults: summary printed and written, graph written, feature maps on."""
    return _seed_cnn_run(logdir, summary=True, graph=True)


def log_inputs(logdir: Path) -> Any:
    return _seed_cnn_run(logdir, log_inputs=True, **QUIET)


def optimizer_clock(logdir: Path) -> Any:
    """``optimizer=``: one step per ``optimizer.step()``, two forwards each (accumulation)."""
    torch.manual_seed(0)
    model = SeedCNN()
    opt = make_optimizer(model)
    with watch(model, logdir, every=EVERY, optimizer=opt, **QUIET) as w:
        for _ in range(STEPS):
            opt.zero_grad()
            for _ in range(2):
                x, y = seed_cnn_batch()
                (seed_cnn_loss(model(x), y) / 2).backward()
            opt.step()
    return w


def step_fn_clock(logdir: Path) -> Any:
    """``step_fn=``: an external counter that moves every second forward."""
    torch.manual_seed(0)
    model = SeedCNN()
    opt = make_optimizer(model)
    counter = {"step": 0}
    with watch(model, logdir, every=EVERY, step_fn=lambda: counter["step"], **QUIET) as w:
        for i in range(2 * STEPS):
            x, y = seed_cnn_batch()
            (seed_cnn_loss(model(x), y) / 2).backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
                counter["step"] += 1
    return w


def nan_ignored(logdir: Path) -> Any:
    """A zero padding row at step 2 makes ``x / ||x||`` NaN in ``body.normalize``; ``"ignore"``
    records the finding without a warning, and the loop skips the non-finite step."""
    torch.manual_seed(0)
    model = DeepTanhNet()
    x, y = regression_data(256, 8, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model, logdir, every=EVERY, on_nonfinite="ignore", **QUIET) as w:
        for step, (xb, yb) in enumerate(batches(x, y, 16, STEPS, 0)):
            if step == 2:
                xb = xb.clone()
                xb[5] = 0.0
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
    return w


def _mlp_run(logdir: Path, model: nn.Module, batch: int) -> Any:
    x, y = regression_data(512, 8, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, logdir, every=EVERY, **QUIET) as w:
        for xb, yb in batches(x, y, batch, STEPS, 0):
            loss = F.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w


def dead_relu(logdir: Path) -> Any:
    """A hidden bias of -10: every unit of ``act2`` is off for every sample (dead_units)."""
    torch.manual_seed(0)
    model = mlp([8, 32, 32, 1], nn.ReLU)
    nn.init.constant_(model.fc2.bias, -10.0)
    return _mlp_run(logdir, model, 64)


def vanishing(logdir: Path) -> Any:
    """A 12-layer sigmoid MLP: the first layers' gradients are orders of magnitude below the median."""
    torch.manual_seed(0)
    return _mlp_run(logdir, mlp([8] + [32] * 12 + [1], nn.Sigmoid), 64)


def hparams_finish(logdir: Path) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    hparams = {"lr": 0.01, "optimizer": "sgd", "nesterov": False, "layers": 2}
    with watch(model, logdir, every=EVERY, hparams=hparams, **QUIET) as w:
        train(model, lambda: (torch.randn(4, 10), torch.randn(4, 4)), F.mse_loss, STEPS, make_optimizer(model))
        w.finish(metrics={"final_loss": 0.5, "val_acc": 0.75})
    return w


SCENARIOS = [
    Scenario("summary_and_graph", summary_and_graph),
    Scenario("log_inputs", log_inputs),
    Scenario("optimizer_clock", optimizer_clock),
    Scenario("step_fn_clock", step_fn_clock),
    Scenario("nan_ignored", nan_ignored),
    Scenario("dead_relu", dead_relu),
    Scenario("vanishing_gradient", vanishing),
    Scenario("hparams_finish", hparams_finish),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_golden(scenario: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture, update_golden: bool):
    w = scenario.run(tmp_path / "run")
    check_golden(scenario.name, snapshot(tmp_path / "run", w, capsys.readouterr().out), update_golden)


def test_golden_files_have_a_test():
    """A golden file whose scenario was renamed or dropped is stale: it proves nothing."""
    names = {f"zoo_{n}" for n in ZOO_IDS} | {s.name for s in SCENARIOS}
    stale = sorted(p.stem for p in GOLDEN.glob("*.json") if p.stem not in names)
    assert not stale, f"golden files without a scenario: {stale}"


def test_diff_names_what_changed():
    """The diff a failing golden test prints: added, missing and changed entries by path."""
    expected = {"runs": {".": {"scalars": {"a": [0, 2], "b": [0]}}}, "alerts": [{"kind": "x"}]}
    actual = {"runs": {".": {"scalars": {"a": [0, 2, 4], "c": [0]}}}, "alerts": [{"kind": "y"}]}
    assert _diff_lines("g", expected, actual) == [
        "  missing alert {'kind': 'x'}",
        "  added   alert {'kind': 'y'}",
        "  missing g/runs/./scalars/b",
        "  added   g/runs/./scalars/c: [0]",
        "  changed g/runs/./scalars/a: expected [0, 2], got [0, 2, 4]",
    ]

"""examples/broken_training.py: four runs that go wrong in known ways; the debugger names each culprit."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from introspect import NonFiniteWarning
from tests.support import REPO_ROOT
from tests.support.events import read_events, text_of

SCRIPT = REPO_ROOT / "examples" / "broken_training.py"

from examples import broken_training

SCENARIOS = ("nan", "exploding", "dead_relu", "vanishing")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("broken")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = broken_training.main(["--quick", "--logdir", str(logdir)])
    return logdir, found, record


def where(alerts, kind: str) -> list[str]:
    return [a.where for a in alerts if a.kind == kind]


def test_every_scenario_runs_and_finds_something(quick_run):
    _, found, _ = quick_run
    assert list(found) == list(SCENARIOS)
    for name, alerts in found.items():
        assert alerts, f"{name}: the debugger found nothing"


def test_nan_scenario_names_the_normalisation_layer(quick_run):
    _, found, record = quick_run
    alerts = found["nan"]
    assert [(a.kind, a.where, a.step, a.phase) for a in alerts] == [("nonfinite", "body.normalize", 10, "forward")]
    assert alerts[0].module_type == "L2Normalize"
    assert alerts[0].numbers["later_nonfinite_modules"] == 5  # the 4 Linears after it and the head
    warned = [str(r.message) for r in record if issubclass(r.category, NonFiniteWarning)]
    assert any("body.normalize" in m for m in warned)


def test_exploding_scenario_names_every_layer_first(quick_run):
    _, found, _ = quick_run
    alerts = [a for a in found["exploding"] if a.kind == "exploding_gradient"]
    first_step = min(a.step for a in alerts)
    first = {a.where for a in alerts if a.step == first_step}
    assert first == {"fc2", "fc1"}
    assert first_step == 5  # the first logging step after step 0 (every=5)
    assert {a.where for a in alerts} == {"fc1", "fc2", "out"}  # the output layer follows
    assert all(a.numbers["norm"] > 1e5 for a in alerts if a.kind == "exploding_gradient")


def test_dead_relu_scenario_names_the_relu(quick_run):
    _, found, _ = quick_run
    alerts = found["dead_relu"]
    dead = [a for a in alerts if a.kind == "dead_units"]
    assert [(a.where, a.step, a.module_type) for a in dead] == [("act2", 0, "ReLU")]
    assert dead[0].numbers["dead_fraction"] == 1.0
    # Nothing flows back through a dead layer: the layers before it get no gradient at all.
    assert sorted(where(alerts, "vanishing_gradient")) == ["fc1", "fc2"]
    assert {a.kind for a in alerts} == {"dead_units", "vanishing_gradient"}


def test_vanishing_scenario_names_the_first_layers(quick_run):
    _, found, _ = quick_run
    vanishing = where(found["vanishing"], "vanishing_gradient")
    assert "fc1" in vanishing
    assert set(vanishing) <= {"fc1", "fc2", "fc3", "fc4"}, vanishing


def test_vanishing_scenario_has_no_exploding_false_alarm(quick_run):
    """The deep sigmoid net's output barely depends on its input, so every layer's gradient scales
    with the batch's mean error. Step 0's batch happened to have a mean error near 0 (out.bias.grad
    8.8e-4; -0.14 at step 10), so all 13 layers' gradient norms were ~160x below their usual size
    and step 10 looks like a x160 "jump" everywhere. That is batch noise, not an explosion: lr is
    0.01 and every norm stays below 1. A vanishing-gradient demo must not report exploding ones."""
    _, found, _ = quick_run
    alerts = found["vanishing"]
    assert where(alerts, "exploding_gradient") == [], [str(a) for a in alerts if a.kind == "exploding_gradient"]


def test_each_scenario_writes_its_own_event_files(quick_run):
    logdir, found, _ = quick_run
    for name, alerts in found.items():
        acc = read_events(logdir / name)
        texts = text_of(acc, "diagnostics/alerts")
        assert texts, name
        assert f"`{alerts[0].where}`" in texts[-1]
        assert "train/loss" in acc.Tags()["scalars"]
    # A gradient finding draws the gradient flow.
    assert "diagnostics/grad_flow" in read_events(logdir / "vanishing").Tags()["images"]


@pytest.mark.slow
def test_script_prints_each_report(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,  # the script finds the package from its own location
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    headings = [line for line in out.splitlines() if line.startswith("(")]
    assert [h[:3] for h in headings] == ["(a)", "(b)", "(c)", "(d)"]
    # Each report, in order, with its culprit.
    reports = out.split("introspect: ")[1:]
    assert len(reports) == 4, out
    assert "nonfinite (forward)" in reports[0] and "body.normalize" in reports[0]
    assert "exploding_gradient" in reports[1] and "fc1" in reports[1]
    assert "dead_units" in reports[2] and "act2" in reports[2]
    assert "vanishing_gradient" in reports[3] and "fc1" in reports[3]
    for name in SCENARIOS:
        assert (tmp_path / name).is_dir()


def test_only_runs_one_scenario(tmp_path):
    found = broken_training.main(["--quick", "--logdir", str(tmp_path), "--only", "dead_relu"])
    assert list(found) == ["dead_relu"]
    assert not (tmp_path / "nan").exists()

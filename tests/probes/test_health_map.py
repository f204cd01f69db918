"""The health map: the accumulator fed with a real watch run's steps, the same map rebuilt from
that run's event files, the pictures, and ``introspect map`` on finished runs."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from introspect import watch
from introspect.analysis.health_map_render import (
    STATS,
    HealthMap,
    find_run,
    health_map_from_events,
    health_map_tag,
    read_alerts,
)
from introspect.cli.commands import main
from introspect.errors import ConfigError, LoadError, NonFiniteWarning
from introspect.live import DEFAULT_LOG
from introspect.records import sinks
from introspect.records.step import HostStep
from tests.support.events import hist_at, read_events

FINDING_RGB = (0xE4, 0x1A, 0x1C)


def dead_mlp() -> nn.Sequential:
    """fc2's bias of -10 kills act2 for every sample: act2 is dead, fc1/fc2 get no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 32),
            act2=nn.ReLU(),
            out=nn.Linear(32, 1),
        )
    )
    nn.init.constant_(model.fc2.bias, -10.0)
    return model


def watched_run(logdir: Path, monkeypatch, steps: int = 12, every: int = 2) -> tuple[list[HostStep], list]:
    """Train ``dead_mlp`` under watch(optimizer=...) and keep every HostStep it writes (the
    watcher's own call of ``sinks.write_step``, wherever it imported it from)."""
    captured: list[HostStep] = []
    original = sinks.write_step

    def keeping(writer, host):
        captured.append(host)
        return original(writer, host)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("introspect") and getattr(module, "write_step", None) is original:
            monkeypatch.setattr(module, "write_step", keeping)
    model = dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    log = (*DEFAULT_LOG, "memory")  # every statistic of the map, the saved bytes included
    with watch(model, logdir, every=every, optimizer=opt, log=log, summary=False, graph=False) as w:
        for _ in range(steps):
            x = torch.randn(64, 8, generator=g)
            loss = F.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert captured, "the watcher wrote no step through sinks.write_step"
    return captured, w.alerts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("health") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        hosts, alerts = watched_run(logdir, monkeypatch)
    return logdir, hosts, alerts


ROWS = ["fc1", "act1", "fc2", "act2", "out"]


# --------------------------------------------------------------------------- live
def test_accumulator_fed_by_a_watch_run(run):
    logdir, hosts, alerts = run
    hm = HealthMap()
    for host in hosts:
        hm.add(host.step, host, alerts)
    assert hm.rows == ROWS  # execution order
    assert hm.steps == [h.step for h in hosts] == list(range(0, 12, 2))
    assert hm.available() == ["grad_rms", "activation_std", "dead_fraction", "update_ratio", "nonfinite", "saved_bytes"]
    acc = read_events(logdir)
    grad = hm.matrix("grad_rms")
    for i, row in enumerate(ROWS):
        for j, step in enumerate(hm.steps):
            h = hist_at(acc, f"activation_grads/{row}", step) if row in ("act2", "out") else None
            if h is not None:
                assert grad[i, j] == pytest.approx(math.sqrt(h.sum_squares / h.num), rel=1e-12)
    assert (grad[:3] == 0).all()  # nothing flows back through the dead act2
    assert (grad[3:] > 0).all()
    dead = hm.matrix("dead_fraction")
    assert (dead[ROWS.index("act2")] == 1.0).all()
    assert np.isnan(dead[ROWS.index("fc1")]).all()  # a Linear has no dead fraction
    ratio = hm.matrix("update_ratio")
    assert np.isnan(ratio[ROWS.index("act1")]).all()  # no parameters
    # act2 feeds out zeros: out.weight gets no gradient and stays put (only out.bias learns);
    # the map shows the weight's ratio, an exact 0.
    assert (ratio[ROWS.index("out")] == 0).all()
    assert (hm.matrix("nonfinite") == 0).all()
    kinds = {(a.kind, a.where) for a in alerts}
    assert ("dead_units", "act2") in kinds and ("vanishing_gradient", "fc1") in kinds
    marks = {(hm.rows[i], hm.steps[j], a.kind) for i, j, a in hm.marks()}
    assert ("act2", 0, "dead_units") in marks and ("fc1", 0, "vanishing_gradient") in marks


def test_feeding_all_alerts_every_step_keeps_each_once(run):
    _, hosts, alerts = run
    hm = HealthMap()
    for host in hosts:
        hm.add(host.step, host, alerts)
        hm.add_findings(alerts)
    assert len(hm.findings) == len(alerts)


@pytest.mark.parametrize("stat", list(STATS))
def test_render_every_stat(run, stat):
    _, hosts, alerts = run
    hm = HealthMap()
    for host in hosts:
        hm.add(host.step, host, alerts)
    image = hm.render(stat)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert 250 < image.shape[0] < 1500 and 500 < image.shape[1] < 2000
    red = np.all(image == FINDING_RGB, axis=-1)
    assert red.sum() > 30  # the outlined findings (and the legend's swatch)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a picture, not a blank


def test_write_images_to_tensorboard(run, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    _, hosts, alerts = run
    hm = HealthMap()
    for host in hosts:
        hm.add(host.step, host, alerts)
    out = tmp_path / "maps"
    writer = SummaryWriter(str(out))
    written = hm.write(writer, step=10)
    writer.close()
    assert written == [health_map_tag(s) for s in STATS]
    acc = read_events(out)
    assert set(acc.Tags()["images"]) == {f"diagnostics/health_map/{s}" for s in STATS}
    event = acc.Images("diagnostics/health_map/grad_rms")[0]
    assert event.step == 10 and event.width > 500


def test_a_module_is_shown_by_its_weight():
    from introspect.analysis.health_map_render import _module_ratios

    assert _module_ratios({"out.bias": 0.3, "out.weight": 0.01, "ln.bias": 0.2, "p": 0.5, "x.weight": math.nan}) == {
        "out": 0.01,
        "ln": 0.2,
        "p": 0.5,
    }


def test_thinning_keeps_first_and_latest():
    hm = HealthMap(max_columns=4)
    for step in range(10):
        hm.add_values(step, {"grad_rms": {"a": float(step + 1)}}, ["a"])
    assert len(hm.steps) <= 4 and hm.steps[0] == 0 and hm.steps[-1] == 9
    assert hm.matrix("grad_rms")[0].tolist() == [s + 1.0 for s in hm.steps]
    with pytest.raises(ConfigError, match="max_columns"):
        HealthMap(max_columns=1)
    with pytest.raises(ConfigError, match="unknown health map statistic 'loss'"):
        hm.render("loss")


# --------------------------------------------------------------------------- from event files
def test_the_same_map_from_event_files(run):
    logdir, hosts, alerts = run
    live = HealthMap()
    for host in hosts:
        live.add(host.step, host, alerts)
    offline = health_map_from_events(logdir)
    assert offline.offline and offline.rows == live.rows and offline.steps == live.steps
    for stat in ("grad_rms", "activation_std", "nonfinite"):
        np.testing.assert_allclose(offline.matrix(stat), live.matrix(stat), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(
        offline.matrix("update_ratio"), live.matrix("update_ratio"), rtol=1e-6, equal_nan=True
    )  # float32 scalars
    # Offline, the dead fraction is what the histograms prove: act2's output was 0 everywhere.
    dead = offline.matrix("dead_fraction")
    assert (dead[ROWS.index("act2")] == 1.0).all() and np.isnan(dead[ROWS.index("act1")]).all()

    # The table lists the root causes first, then what followed each: the same findings, links and all.
    def key(a):
        return (a.kind, a.where, a.step, a.phase, None if a.cause is None else (a.cause.kind, a.cause.where))

    assert sorted(map(key, offline.findings)) == sorted(map(key, alerts))
    back = read_alerts(read_events(logdir))
    assert sorted(map(key, back)) == sorted(map(key, alerts))
    assert [a.cause for a in back[: sum(a.cause is None for a in alerts)]] == [None] * sum(
        a.cause is None for a in alerts
    )


def test_find_run(tmp_path, run):
    logdir, _, _ = run
    assert find_run(logdir) == logdir
    assert find_run(logdir.parent) == logdir  # the one run below
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(LoadError, match=r"holds 2 runs \(a, b\); give one of them"):
        find_run(tmp_path / "runs")
    with pytest.raises(LoadError, match="no such directory"):
        find_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no TensorBoard event files"):
        find_run(tmp_path / "empty")


# --------------------------------------------------------------------------- introspect map
def test_cli_map_on_a_finished_run(run, tmp_path):
    logdir, _, _ = run
    out = tmp_path / "map.png"
    result = CliRunner().invoke(main, ["map", str(logdir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for stat in STATS:
        path = tmp_path / f"map_{stat}.png"
        assert f"{stat}: {path}" in result.output
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 500
    assert "5 modules x 6 logging steps" in result.output
    one = CliRunner().invoke(main, ["map", str(logdir), "--stat", "grad_rms", "--out", str(tmp_path / "g.png")])
    assert one.exit_code == 0 and (tmp_path / "g.png").is_file()


def test_cli_map_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["map", str(tmp_path / "nope")])
    assert missing.exit_code == 3 and missing.output.startswith("error:") and "no such directory" in missing.output
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "scalars_only"))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    not_watch = runner.invoke(main, ["map", str(tmp_path / "scalars_only")])
    assert not_watch.exit_code == 3 and "not a run watch() wrote" in not_watch.output
    bad_stat = runner.invoke(main, ["map", str(tmp_path), "--stat", "loss"])
    assert bad_stat.exit_code == 2


def test_cli_map_stat_without_data(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with watch(model, tmp_path / "r", every=1, summary=False, graph=False):
        model(torch.randn(2, 4)).sum().backward()
    result = CliRunner().invoke(main, ["map", str(tmp_path / "r"), "--stat", "update_ratio"])
    assert result.exit_code == 1 and "has no data for update_ratio" in result.output


def test_cli_stat_choices_are_the_stats():
    command = main.get_command(None, "map")
    choices = next(p for p in command.params if p.name == "stats").type.choices
    assert list(choices) == list(STATS)


def test_broken_training_nan_map(tmp_path):
    """The must-show case: examples/broken_training.py's NaN run, drawn from its event files.
    The non-finite map has the finding on body.normalize, NaN in its output and every later
    one at that step, and in the gradients of the layers before it (backward carried it up)."""
    from examples import broken_training

    with pytest.warns(NonFiniteWarning, match="body.normalize"):
        broken_training.main(["--quick", "--only", "nan", "--logdir", str(tmp_path)])
    hm = health_map_from_events(tmp_path / "nan")
    assert hm.rows[0] == "stem" and hm.rows[-1] == "head" and "body.normalize" in hm.rows
    (finding,) = [a for a in hm.findings if a.kind == "nonfinite"]
    assert finding.where == "body.normalize"
    counts = hm.matrix("nonfinite")
    column = hm.steps.index(finding.step)
    normalize = hm.rows.index("body.normalize")
    assert (counts[:, column] > 0).all()  # every row: output or gradient non-finite
    assert counts[normalize, column] >= 32  # 32 NaN outputs (one sample of 32 features), more in its gradient
    assert (counts[:, :column] == 0).all() and (counts[:, column + 1 :] == 0).all()  # one bad batch only
    marks = [(hm.rows[i], hm.steps[j]) for i, j, _ in hm.marks()]
    assert marks == [("body.normalize", finding.step)]
    result = CliRunner().invoke(
        main, ["map", str(tmp_path / "nan"), "--stat", "nonfinite", "--out", str(tmp_path / "nan.png")]
    )
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "nan.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert np.all(pixels == FINDING_RGB, axis=-1).sum() > 30


def train_dead_mlp(logdir: Path, steps: int = 9, **options):
    model = dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with watch(model, logdir, every=2, optimizer=opt, summary=False, graph=False, **options) as w:
        for _ in range(steps):
            x = torch.randn(64, 8, generator=g)
            loss = F.mse_loss(model(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w


def test_watch_writes_the_health_map_at_image_steps_and_at_close(tmp_path, monkeypatch):
    from introspect.probes import time_share

    monkeypatch.setattr(time_share, "RENDER_SHARE", float("inf"))  # every image step fits, however fast the steps
    w = train_dead_mlp(tmp_path / "run", image_every=6)
    acc = read_events(tmp_path / "run")
    maps = {t for t in acc.Tags()["images"] if t.startswith("diagnostics/health_map/")}
    assert {health_map_tag(s) for s in ("grad_rms", "activation_std", "dead_fraction", "update_ratio")} <= maps
    # Step 0 has one column only (nothing to draw yet); step 6 is an image step; step 8 is the close.
    assert [e.step for e in acc.Images(health_map_tag("grad_rms"))] == [6, 8]
    dead = [a for a in w.alerts if a.kind == "dead_units"]
    assert dead and dead[0].where == "act2"
    picture = acc.Images(health_map_tag("dead_fraction"))[-1]
    assert picture.width > 200 and picture.height > 100


def test_the_health_map_is_on_by_default_and_its_live_pictures_keep_to_their_share(tmp_path):
    # A run of a second or so: drawing at step 6 would take far more than RENDER_SHARE of it, so
    # the live pictures wait; the close draws the whole run's map whatever the share.
    train_dead_mlp(tmp_path / "run", image_every=6)
    acc = read_events(tmp_path / "run")
    assert [e.step for e in acc.Images(health_map_tag("grad_rms"))] == [8]
    # and `introspect map` draws it from a default run's event files
    result = CliRunner().invoke(main, ["map", str(tmp_path / "run"), "--out", str(tmp_path / "map.png")])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob("map*.png"))


def test_the_health_map_can_be_turned_off(tmp_path):
    log = [k for k in DEFAULT_LOG if k != "health_map"]
    with watch(dead_mlp(), tmp_path / "run", every=1, log=log, summary=False, graph=False) as w:
        for _ in range(3):
            w.model(torch.randn(4, 8)).sum().backward()
    assert not [t for t in read_events(tmp_path / "run").Tags()["images"] if t.startswith("diagnostics/health_map")]

"""The examples run end to end and leave what they promise in TensorBoard's event files."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from examples.models import SeedCNN
from tests.support import REPO_ROOT
from tests.support.events import read_events, text_of
from tests.support.hparams_records import hparam_values, hparams_records


def test_seed_cnn_has_the_tutorials_parameter_count():
    model = SeedCNN()
    assert sum(p.numel() for p in model.parameters()) == 54_273


def test_seed_cnn_maps_images_to_one_logit():
    import torch

    assert SeedCNN()(torch.rand(2, 3, 32, 32)).shape == (2, 1)


def test_synthetic_images_shape_range_and_labels():
    from examples.data import synthetic_images

    images, labels = synthetic_images(5, seed=3)
    assert images.shape == (10, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.tolist() == [0, 1] * 5
    again, _ = synthetic_images(5, seed=3)
    assert (images == again).all()


def test_write_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    from examples.data import write_image_folder

    write_image_folder(tmp_path, n_per_class=3, seed=0)
    dataset = ImageFolder(str(tmp_path))
    assert dataset.classes == ["0_airplane", "1_automobile"]
    assert len(dataset) == 6


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--quick", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return logdir, result


def test_quickstart_runs(quickstart_run):
    _, result = quickstart_run
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Total params: 54,273" in result.stdout
    assert "final val accuracy" in result.stdout


def test_quickstart_writes_tensorboard_events(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, result = quickstart_run
    assert result.returncode == 0, result.stderr
    ea = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()

    for expected in ("activations/conv1", "weights/conv1.weight", "grads/conv1.weight", "activation_grads/conv1"):
        assert expected in tags["histograms"], f"{expected} missing; histograms: {sorted(tags['histograms'])}"
    assert "train/loss" in tags["scalars"], sorted(tags["scalars"])
    assert "val/acc" in tags["scalars"], sorted(tags["scalars"])
    assert "model/summary/text_summary" in tags["tensors"], sorted(tags["tensors"])
    assert tags["graph"] is True

    # 2 training steps in --quick mode: step 0 is a logging step, and it logged every layer.
    assert [e.step for e in ea.Histograms("activations/conv1")] == [0]
    assert [e.step for e in ea.Scalars("train/loss")] == [0, 1]


# --------------------------------------------------------------------------- the seed scenarios
def test_sigmoid_cnn_is_the_first_tutorials_cnn():
    import torch

    from examples.models import SigmoidCNN

    model = SigmoidCNN()
    assert sum(p.numel() for p in model.parameters()) == 54_273
    out = model(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 1) and bool(((out > 0) & (out < 1)).all())


def input_shape(graph) -> list[int]:
    """The traced input's shape, from the graph's input node."""
    (node,) = [n for n in graph.node if n.name.startswith("input/")]
    return [d.size for d in node.attr["_output_shapes"].list.shape[0].dim]


def test_graph_example_writes_both_tutorial_graphs_and_the_summary(tmp_path, capsys):
    from examples import graph

    result = graph.main(["--quick", "--logdir", str(tmp_path)])
    assert result["graphs"] == {"seed000_cnn224": True, "seed001_cnn32": True}
    assert result["params"] == 54_273
    assert "Total params: 54,273" in result["summary"]
    assert "Total params: 54,273" in capsys.readouterr().out

    first = read_events(tmp_path / "seed000_cnn224")
    assert first.Tags()["graph"] is True
    assert input_shape(first.Graph()) == [1, 3, 224, 224]
    names = {n.name.split("/")[1] for n in first.Graph().node if n.name.startswith("SigmoidCNN/")}
    assert {"Conv2d[conv1]", "MaxPool2d[pool]", "Conv2d[conv2]", "Linear[linear2]", "Sigmoid[sigmoid]"} <= names

    second = read_events(tmp_path / "seed001_cnn32")
    assert second.Tags()["graph"] is True
    assert input_shape(second.Graph()) == [1, 3, 32, 32]
    names = {n.name.split("/")[1] for n in second.Graph().node if n.name.startswith("SeedCNN/")}
    assert "Dropout2d[dropout]" in names
    (text,) = text_of(second, "model/summary")
    assert "Total params: 54,273" in text and "Conv2d" in text


def test_scalars_example_reaches_the_minimum(tmp_path):
    from examples import scalars

    result = scalars.main(["--quick", "--logdir", str(tmp_path)])
    assert result["steps"] == 500
    assert result["x"] == pytest.approx(1.0, abs=1e-4)
    assert result["y"] == pytest.approx(0.0, abs=1e-6)

    acc = read_events(tmp_path)
    xs = acc.Scalars("x")
    assert [e.step for e in xs] == list(range(500))
    assert xs[0].value == pytest.approx(0.02)  # one SGD step from 0: 0 - 0.01 * f'(0) = 0.02
    assert xs[-1].value == pytest.approx(1.0, abs=1e-4)
    assert [e.value for e in acc.Scalars("y")][:2] == pytest.approx([1.0, 0.9604])  # f(0), f(0.02)
    # The watcher's gradient norm is |f'(x)| = |2x - 2| at the x each logged step started from.
    norms = {e.step: e.value for e in acc.Scalars("grad_norm/x")}
    assert sorted(norms) == list(range(0, 500, 10))
    assert norms[0] == pytest.approx(2.0)
    assert norms[100] == pytest.approx(2 * 0.98**100, rel=1e-4)
    assert "weights/x" in acc.Tags()["histograms"]


def test_histograms_example_shifting_normal_and_watched_weights(tmp_path):
    from examples import histograms

    result = histograms.main(["--quick", "--logdir", str(tmp_path)])

    normal = read_events(tmp_path / "normal")
    events = normal.Histograms("w")
    assert [e.step for e in events] == list(range(20))
    means = [e.histogram_value.sum / e.histogram_value.num for e in events]
    assert means == pytest.approx(result["normal_means"], rel=1e-5)
    assert means == pytest.approx(list(range(-10, 10)), abs=0.15)  # 2000 samples of N(mean, 1)
    assert all(b > a for a, b in zip(means, means[1:]))

    cnn = read_events(tmp_path / "cnn")
    tag = f"weights/{result['param']}"
    seen = result["weight_means"]
    assert sorted(seen) == [0, 10, 20, 30]
    events = cnn.Histograms(tag)
    assert [e.step for e in events] == [0, 10, 20, 30]
    for e in events:  # weights/{p} at step k are the values step k's forward used
        assert e.histogram_value.sum / e.histogram_value.num == pytest.approx(seen[e.step], rel=1e-4)
    first, last = events[0].histogram_value, events[-1].histogram_value
    assert last.max - last.min > first.max - first.min  # Adam spreads the weights out
    assert {"weights/conv1.weight", "grads/conv1.weight", "activations/conv1"} <= set(cnn.Tags()["histograms"])


def test_ring_example_quick_logs_losses_accuracies_and_weights(tmp_path):
    from examples import ring

    result = ring.main(["--quick", "--logdir", str(tmp_path)])
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert sum(p.numel() for p in result["model"].parameters()) == 193

    acc = read_events(tmp_path)
    steps_per_epoch = 350  # 5,600 training points in batches of 16
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [steps_per_epoch * k - 1 for k in (1, 2, 3)], name
        assert [e.value for e in events] == pytest.approx([row[name] for row in history], rel=1e-6), name
    val_loss = [row["val/loss"] for row in history]
    assert val_loss[0] > val_loss[1] > val_loss[2]  # Adam at 1e-4 is slow, but it goes down
    assert all(0.0 <= row["val/acc"] <= 1.0 for row in history)

    # One logging step per epoch (every = steps per epoch): the weights after each epoch's start.
    assert [e.step for e in acc.Histograms("weights/fc1.weight")] == [0, 350, 700]
    assert {"activations/act1", "activation_grads/fc3", "grads/fc3.bias"} <= set(acc.Tags()["histograms"])
    assert "update_ratio/fc1.weight" in acc.Tags()["scalars"]
    (text,) = text_of(acc, "model/summary")
    assert "Total params: 193" in text
    assert acc.Tags()["graph"] is True

    # The run's hyperparameters and its best epoch, for the HPARAMS tab.
    records = hparams_records(tmp_path)
    assert hparam_values(records["start"]) == {
        "lr": 1e-4,
        "batch_size": 16.0,
        "hidden": "16-8",
        "patience": 10.0,
        "max_epochs": 100.0,
    }
    metrics = {m.name.tag for m in records["experiment"].metric_infos}
    assert metrics == {"hparams/best_val_acc", "hparams/best_epoch", "hparams/epochs"}
    best_epoch = max(history, key=lambda row: row["val/acc"])["epoch"]
    assert acc.Scalars("hparams/best_epoch")[-1].value == best_epoch == result["best_epoch"]
    assert acc.Scalars("hparams/best_val_acc")[-1].value == pytest.approx(result["best_val_acc"])


def test_examples_share_one_command_line(capsys):
    from examples import graph, histograms, ring, scalars

    for module, name in ((graph, "graph"), (histograms, "histograms"), (scalars, "scalars"), (ring, "ring")):
        args = module.parse_args([])
        assert (args.logdir, args.quick, args.seed) == (f"runs/{name}", False, 0)
    with pytest.raises(SystemExit) as exit_info:
        ring.parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs: must be >= 1, got 0" in capsys.readouterr().err


def test_custom_probe_example_writes_its_scalars(tmp_path, capsys):
    from examples import custom_probe

    result = custom_probe.main(["--quick", "--logdir", str(tmp_path)])
    assert result["steps"] == 20
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {
        "sparsity/zero_fraction/relu",
        "peak/out/conv1",
        "peak/out/conv2",
        "peak/grad/conv1",
        "peak/grad/conv2",
    } <= tags
    assert [e.step for e in acc.Scalars("peak/out/conv1")] == [0, 5, 10, 15]
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("sparsity/zero_fraction/relu"))
    assert all(e.value > 0 for e in acc.Scalars("peak/grad/conv2"))
    assert "sparsity/zero_fraction/relu" in capsys.readouterr().out.replace("{module}", "relu")


def test_transformer_instability_names_the_attention_layer(tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "transformer_instability.py"),
            "--quick",
            "--logdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    healthy, broken = result.stdout.split("== broken")
    assert "no problems found in 40 steps" in healthy
    # The attention layer opens the report: its q/k projection's output shift hangs under it.
    first_root = broken.splitlines()[3]
    assert re.match(r"\d+\s+attention_logit_growth\s+transformer\.h\.1\.attn\s", first_root), broken
    assert "grad_norm_spike" in broken
    acc = read_events(tmp_path / "broken")
    assert "attention/max_logit/transformer.h.1.attn" in acc.Tags()["scalars"]
    (pre_spike,) = text_of(acc, "diagnostics/pre_spike")
    assert "| attention/entropy/transformer.h.1.attn |" in pre_spike

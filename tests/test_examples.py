"""The examples run end to end and leave what they promise in TensorBoard's event files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from examples.models import SeedCNN  # noqa: E402


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

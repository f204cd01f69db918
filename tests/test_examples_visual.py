"""examples/raw_images.py and examples/feature_maps.py in quick mode: what they leave in TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from examples import feature_maps, raw_images
from tests.support import REPO_ROOT
from tests.support.events import read_events, text_of


def test_raw_images_quick(tmp_path, capsys):
    reports = raw_images.main(["--quick", "--logdir", str(tmp_path)])
    assert reports["clean"].alerts == []
    assert reports["clean"].class_counts == [27, 27]
    found = {a.kind for a in reports["flawed"].alerts}
    assert found == {"data_constant", "data_duplicates", "data_imbalance"}
    out = capsys.readouterr().out
    assert "{'0_airplane': 0, '1_automobile': 1}" in out and "data_imbalance" in out

    clean = read_events(tmp_path / "clean")
    first, batch = clean.Images("data/first_image")[0], clean.Images("data/batch")[0]
    assert (first.width, first.height) == (32, 32)
    assert (batch.width, batch.height) == (8 * 34 + 2, 7 * 34 + 2)  # 54 images, 8 a row
    assert {"data/samples", "data/class_balance"} <= set(clean.Tags()["images"])
    assert "No problems found" in text_of(clean, "data/findings")[0]
    assert "data_duplicates" in text_of(read_events(tmp_path / "flawed"), "data/findings")[0]


def test_feature_maps_quick(tmp_path, capsys):
    result = feature_maps.main(["--quick", "--logdir", str(tmp_path)])
    assert result["steps"] == 4 and result["image_steps"] == [0, 2]
    assert result["alerts"] == []
    acc = read_events(tmp_path)
    for layer, side in (("conv1", 6 * 31 + 1), ("conv2", 8 * 23 + 1)):
        events = acc.Images(f"feature_maps/{layer}")
        assert [e.step for e in events] == [0, 2]
        assert (events[0].width, events[0].height) == (side, side)
    assert [e.step for e in acc.Images("data/inputs")] == [0]
    assert "train/loss" in acc.Tags()["scalars"] and "activations/conv1" in acc.Tags()["histograms"]
    assert "no problems found in 4 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_raw_images_runs_as_a_script(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "raw_images.py"), "--quick", "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "introspect: 3 findings" in result.stdout
    assert "data/samples" in read_events(tmp_path / "clean").Tags()["images"]

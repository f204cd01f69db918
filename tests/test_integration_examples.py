"""The callback examples run end to end (--quick) and leave the contract tags at the trainer's steps."""

from __future__ import annotations

import pytest

from tests.support.events import hist_steps, read_events
from tests.support.hparams_records import hparams_records, metric_tags

pytestmark = pytest.mark.slow


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from examples.lightning_callback import main

    result = main(["--quick", "--logdir", str(tmp_path / "run")])
    assert result["global_step"] == 2 and result["alerts"] == 0
    acc = read_events(tmp_path / "run")
    assert hist_steps(acc, "activations/model.conv1") == [0]
    assert hist_steps(acc, "grads/model.linear2.weight") == [0]
    assert "val_acc" in acc.Tags()["scalars"]  # Lightning's own scalar, in the same run
    assert set(metric_tags(hparams_records(tmp_path / "run")["experiment"])) == {
        "hparams/train_loss",
        "hparams/val_acc",
    }


def test_hf_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from examples.hf_callback import main

    result = main(["--quick", "--logdir", str(tmp_path / "run")])
    assert result["global_step"] == 10
    acc = read_events(tmp_path / "run")
    assert hist_steps(acc, "activations/bert.encoder.layer.1.output.dense") == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert hist_steps(acc, "grads/classifier.weight") == list(range(10))
    assert "hparams/train_loss" in metric_tags(hparams_records(tmp_path / "run")["experiment"])

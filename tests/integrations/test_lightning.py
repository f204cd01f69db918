"""introspect.integrations.lightning: the callback inside a real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from introspect import ConfigError
from introspect.integrations.lightning import IntrospectCallback
from tests.support.events import hist_steps, read_events, tags_with_prefix  # noqa: E402
from tests.support.hooks import count_hooks, hook_state  # noqa: E402
from tests.support.hparams_records import event_dirs, hparam_values, hparams_records, metric_tags, status_name  # noqa: E402

CONTRACT = {
    "activations/net.0",
    "activations/net.1",
    "activations/net.2",
    "activation_grads/net.0",
    "activation_grads/net.2",
    "weights/net.0.weight",
    "weights/net.0.bias",
    "weights/net.2.weight",
    "weights/net.2.bias",
    "grads/net.0.weight",
    "grads/net.0.bias",
    "grads/net.2.weight",
    "grads/net.2.bias",
}


class TinyModule(L.LightningModule):
    """training_step calls its child directly (never self(x)), as many LightningModules do."""

    def __init__(self, lr: float = 0.05, hidden: int = 8, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.seen_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at is not None and batch_idx == self.hparams.fail_at:
            raise RuntimeError("training failed on purpose")
        self.seen_steps.append(self.trainer.global_step)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _loader(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(tmp_path: Path, callback: IntrospectCallback, logger, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=str(tmp_path),
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def test_tags_under_the_loggers_directory_with_global_step(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    before = count_hooks(hook_state(module))
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    callback = IntrospectCallback(every=2)
    trainer = _trainer(tmp_path, callback, logger, max_steps=5, accumulate_grad_batches=2)
    trainer.fit(module, _loader())

    assert trainer.global_step == 5
    # Two micro-batches per optimizer step, each seeing the same global_step.
    assert module.seen_steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert event_dirs(tmp_path) == {Path(logger.log_dir)}  # the logger's run, nothing beside it
    acc = read_events(logger.log_dir)
    assert CONTRACT <= tags_with_prefix(acc, "")
    for name in CONTRACT:
        assert hist_steps(acc, name) == [0, 2, 4], name
    assert [int(e.histogram_value.num) for e in acc.Histograms("activations/net.2")] == [16, 16, 16]
    assert count_hooks(hook_state(module)) == before

    records = hparams_records(logger.log_dir)
    assert hparam_values(records["start"]) == {"lr": 0.05, "hidden": 8.0, "fail_at": "None"}
    assert metric_tags(records["experiment"]) == ["hparams/train_loss"]


def test_hooks_removed_when_training_raises(tmp_path):
    module = TinyModule(fail_at=3)
    before = count_hooks(hook_state(module))
    callback = IntrospectCallback(every=1)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer = _trainer(tmp_path, callback, logger, max_steps=10)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        trainer.fit(module, _loader())
    assert count_hooks(hook_state(module)) == before
    acc = read_events(trainer.logger.log_dir)
    assert hist_steps(acc, "weights/net.0.weight") == [0, 1, 2]  # every completed step is on disk
    assert status_name(hparams_records(trainer.logger.log_dir)["end"]) == "STATUS_FAILURE"
    # The same callback and module can train again.
    module.hparams.fail_at = None
    _trainer(tmp_path, callback, False, max_steps=2).fit(module, _loader())
    assert count_hooks(hook_state(module)) == before


def test_without_a_tensorboard_logger_writes_under_default_root_dir(tmp_path):
    module = TinyModule()
    callback = IntrospectCallback(every=1, hparams={"note": "csv"})
    trainer = _trainer(tmp_path, callback, CSVLogger(str(tmp_path)), max_steps=2)
    trainer.fit(module, _loader())
    run = tmp_path / "introspect" / "version_0"
    assert event_dirs(tmp_path) == {run}
    acc = read_events(run)
    assert hist_steps(acc, "weights/net.0.weight") == [0, 1]
    assert hparam_values(hparams_records(run)["start"])["note"] == "csv"


def test_only_global_rank_zero_watches():
    module = TinyModule()
    before = count_hooks(hook_state(module))
    callback = IntrospectCallback()
    callback.on_fit_start(SimpleNamespace(is_global_zero=False, global_step=0), module)
    assert callback.watcher is None
    assert count_hooks(hook_state(module)) == before


@pytest.mark.parametrize(
    "options, match",
    [
        ({"writer": "runs/x"}, "sets \\['writer'\\] itself"),
        ({"step_fn": lambda: 0}, "sets \\['step_fn'\\] itself"),
        ({"evry": 3}, "unknown watch options \\['evry'\\]"),
        ({"optimizer": object()}, "cannot take optimizer="),
        ({"hparams": [1, 2]}, "hparams must be a dict"),
    ],
    ids=["writer", "step_fn", "typo", "optimizer", "hparams"],
)
def test_bad_options_fail_when_the_callback_is_made(options, match):
    with pytest.raises(ConfigError, match=match):
        IntrospectCallback(**options)


def test_with_lightnings_default_hp_metric_its_experiment_record_wins(tmp_path):
    """TensorBoardLogger(default_hp_metric=True) writes its own HPARAMS experiment at fit start;
    TensorBoard keeps the first, so the columns are the hyperparameters and hp_metric (README)."""
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, IntrospectCallback(every=1), logger, max_steps=2).fit(TinyModule(), _loader())
    records = hparams_records(logger.log_dir)
    assert hparam_values(records["start"])["lr"] == pytest.approx(0.05)
    assert metric_tags(records["experiment"]) == ["hp_metric"]

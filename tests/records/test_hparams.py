"""Hyperparameters and final metrics: HPARAMS plugin records in the run's own directory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from introspect import ConfigError, IntrospectError, IntrospectWarning, watch
from introspect.records.run_params import check_hparams, check_metrics
from tests.support import QUIET
from tests.support.events import hist_steps, read_events, scalar_at
from tests.support.hparams_records import event_dirs, hparam_values, hparams_records, metric_tags, status_name
from tests.support.training import train


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _train(model: nn.Module, steps: int = 3) -> None:
    train(model, lambda: (torch.randn(8, 4), torch.randn(8, 1)), nn.functional.mse_loss, steps)


EVERY_STEP = dict(QUIET, every=1)


def test_hparams_and_metrics_in_the_runs_own_directory(logdir):
    hparams = {
        "lr": 0.001,
        "layers": 3,
        "optimizer": "adam",
        "batch_norm": True,
        "sizes": [64, 32],
        "schedule": {"kind": "cosine"},
        "warmup": None,
    }
    with pytest.warns(IntrospectWarning, match=r"\['sizes', 'schedule'\]") as caught:
        w = watch(_mlp(), logdir, hparams=hparams, **EVERY_STEP)
    assert len([c for c in caught if issubclass(c.category, IntrospectWarning)]) == 1
    with w:
        _train(w.model, steps=3)
        w.finish(metrics={"val_acc": 0.92, "loss": torch.tensor(0.25)})

    assert event_dirs(logdir) == {logdir}  # no sub-run: one directory holds everything
    records = hparams_records(logdir)
    assert hparam_values(records["start"]) == {
        "lr": 0.001,
        "layers": 3.0,
        "optimizer": "adam",
        "batch_norm": True,
        "sizes": "[64, 32]",
        "schedule": '{"kind": "cosine"}',
        "warmup": "None",
    }
    assert records["start"].start_time_secs > 0
    infos = {h.name: h.type for h in records["experiment"].hparam_infos}
    from tensorboard.plugins.hparams import api_pb2

    assert infos["batch_norm"] == api_pb2.DATA_TYPE_BOOL
    assert infos["lr"] == api_pb2.DATA_TYPE_FLOAT64
    assert infos["optimizer"] == api_pb2.DATA_TYPE_STRING
    assert metric_tags(records["experiment"]) == ["hparams/val_acc", "hparams/loss"]
    assert status_name(records["end"]) == "STATUS_SUCCESS"

    acc = read_events(logdir)
    assert scalar_at(acc, "hparams/val_acc", 2) == pytest.approx(0.92)
    assert scalar_at(acc, "hparams/loss", 2) == pytest.approx(0.25)
    assert hist_steps(acc, "weights/0.weight") == [0, 1, 2]  # and the histograms beside them


def test_close_without_finish_leaves_the_hparams_readable(logdir):
    with watch(_mlp(), logdir, hparams={"lr": 0.1}, **EVERY_STEP) as w:
        _train(w.model, steps=2)
    records = hparams_records(logdir)
    assert hparam_values(records["start"]) == {"lr": 0.1}
    # No metrics given: no experiment record, so TensorBoard lists the run's scalars as metrics.
    assert records["experiment"] is None and records["end"] is None


def test_hparams_written_at_watch_start_before_any_step(logdir):
    writer = SummaryWriter(str(logdir))
    w = watch(_mlp(), writer, hparams={"lr": 0.1}, **EVERY_STEP)
    writer.flush()
    assert hparam_values(hparams_records(logdir)["start"]) == {"lr": 0.1}
    w.close()
    writer.close()


def test_an_exception_ends_the_session_as_failed(logdir):
    with pytest.raises(RuntimeError, match="boom"):
        with watch(_mlp(), logdir, hparams={"lr": 0.1}, **EVERY_STEP) as w:
            _train(w.model, steps=1)
            raise RuntimeError("boom")
    assert status_name(hparams_records(logdir)["end"]) == "STATUS_FAILURE"
    with pytest.raises(IntrospectError, match="ended already"):
        w.finish(metrics={"val_acc": 0.5})


@pytest.mark.parametrize("own_writer", [True, False], ids=["logdir", "user_writer"])
def test_finish_after_the_block(logdir, own_writer):
    writer = str(logdir) if own_writer else SummaryWriter(str(logdir))
    with watch(_mlp(), writer, hparams={"lr": 0.1}, **EVERY_STEP) as w:
        _train(w.model, steps=2)
    w.finish(metrics={"val_acc": 0.75})
    if not own_writer:
        writer.close()
    records = hparams_records(logdir)
    assert metric_tags(records["experiment"]) == ["hparams/val_acc"]
    assert status_name(records["end"]) == "STATUS_SUCCESS"
    assert scalar_at(read_events(logdir), "hparams/val_acc", 1) == pytest.approx(0.75)


def test_finish_without_hparams_still_makes_a_session(logdir):
    with watch(_mlp(), logdir, **EVERY_STEP) as w:
        _train(w.model, steps=1)
        w.finish(metrics={"val_acc": 0.5})
    records = hparams_records(logdir)
    assert hparam_values(records["start"]) == {}
    assert metric_tags(records["experiment"]) == ["hparams/val_acc"]


def test_finish_twice_is_an_error(logdir):
    with watch(_mlp(), logdir, **EVERY_STEP) as w:
        _train(w.model, steps=1)
        w.finish(metrics={"a": 1.0})
        with pytest.raises(IntrospectError, match="recorded once"):
            w.finish(metrics={"a": 2.0})


def test_finish_closes_the_watch(logdir):
    from tests.support.hooks import count_hooks, hook_state

    model = _mlp()
    before = count_hooks(hook_state(model))
    w = watch(model, logdir, hparams={"lr": 0.1}, **EVERY_STEP)
    _train(model, steps=1)
    w.finish()
    assert count_hooks(hook_state(model)) == before
    assert status_name(hparams_records(logdir)["end"]) == "STATUS_SUCCESS"
    assert hparams_records(logdir)["experiment"] is None  # no metrics, no experiment record


def test_numpy_and_tensor_scalars_are_numbers():
    assert check_hparams({"a": np.float32(0.5), "b": torch.tensor(3), "c": np.bool_(True)}) == {
        "a": 0.5,
        "b": 3,
        "c": True,
    }
    assert check_metrics({"a": np.float64(0.25), "b": torch.tensor([2.0]), "c": 1}) == {"a": 0.25, "b": 2.0, "c": 1.0}


@pytest.mark.parametrize(
    "hparams, match",
    [
        ({"fn": print}, r"hparams\['fn'\]"),
        ({"model": nn.Linear(1, 1)}, r"hparams\['model'\]"),
        ({"nested": [object()]}, r"hparams\['nested'\]"),
        ({"weights": torch.ones(3)}, r"hparams\['weights'\]"),
        ({1: 2}, "non-empty strings"),
        ([("lr", 0.1)], "must be a dict"),
    ],
    ids=["function", "module", "nested_object", "tensor", "int_key", "not_a_dict"],
)
def test_bad_hparams_are_config_errors_naming_the_key(hparams, match, logdir):
    model = _mlp()
    with pytest.raises(ConfigError, match=match):
        watch(model, logdir, hparams=hparams, **EVERY_STEP)
    watch(model, logdir, **EVERY_STEP).close()  # nothing was left attached


@pytest.mark.parametrize(
    "metrics, match",
    [
        ({"val_acc": "high"}, r"metrics\['val_acc'\]"),
        ({"val_acc": None}, r"metrics\['val_acc'\]"),
        ({"val_acc": [0.9]}, r"metrics\['val_acc'\]"),
        ({"": 0.9}, "non-empty strings"),
        (0.9, "must be a dict"),
    ],
    ids=["string", "none", "list", "empty_key", "not_a_dict"],
)
def test_bad_metrics_are_config_errors_naming_the_key(metrics, match, logdir):
    with watch(_mlp(), logdir, **EVERY_STEP) as w:
        with pytest.raises(ConfigError, match=match):
            w.finish(metrics=metrics)


def test_scalar_hparams_raise_no_warning(logdir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)
        watch(_mlp(), logdir, hparams={"lr": 0.1, "name": "x", "bn": False, "n": 3}, **EVERY_STEP).close()


def test_a_writer_without_a_file_writer_warns_once_and_training_goes_on():
    class PlainWriter:
        """SummaryWriter-shaped, but with no _get_file_writer() for plugin records."""

        def __init__(self) -> None:
            self.scalars: list[str] = []

        def add_histogram_raw(self, tag, **kwargs):
            pass

        def add_scalar(self, tag, value, step=None):
            self.scalars.append(tag)

        def add_text(self, tag, text, step=None):
            pass

        def flush(self):
            pass

    writer = PlainWriter()
    with pytest.warns(IntrospectWarning, match="hyperparameters need a torch.utils.tensorboard"):
        with watch(_mlp(), writer, hparams={"lr": 0.1}, **EVERY_STEP) as w:
            _train(w.model, steps=2)
            w.finish(metrics={"val_acc": 0.5})
    assert "grad_norm/0.weight" in writer.scalars


def test_tensorboards_hparams_plugin_compares_the_runs_side_by_side(tmp_path):
    """What the HPARAMS tab shows, asked of the plugin's own backend (as its HTTP handler does)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import (
        data_provider,
        plugin_event_multiplexer,
    )
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        list_session_groups,
    )

    for i, lr in enumerate([0.1, 0.01]):
        with watch(_mlp(), tmp_path / f"run{i}", hparams={"lr": lr, "bn": bool(i)}, **EVERY_STEP) as w:
            _train(w.model, steps=2)
            w.finish(metrics={"val_acc": 0.5 + i / 10})

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    tb = base_plugin.TBContext(
        logdir=str(tmp_path), multiplexer=mux, data_provider=data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    )
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=10,
        allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_UNKNOWN],
        col_params=[
            api_pb2.ColParams(hparam="lr"),
            api_pb2.ColParams(hparam="bn"),
            api_pb2.ColParams(metric=api_pb2.MetricName(tag="hparams/val_acc")),
        ],
    )
    response = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    rows = {
        g.name: (
            g.hparams["lr"].number_value,
            g.hparams["bn"].bool_value,
            round(g.metric_values[0].value, 6),
            api_pb2.Status.Name(g.sessions[0].status),
        )
        for g in response.session_groups
    }
    assert rows == {"run0": (0.1, False, 0.5, "STATUS_SUCCESS"), "run1": (0.01, True, 0.6, "STATUS_SUCCESS")}

"""watch() inputs: the writer it is given (a SummaryWriter, a directory, none, a writer-like object)
and the precise errors for bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import introspect
from introspect import (
    AlreadyWatchedError,
    ConfigError,
    IntrospectWarning,
    ModelTypeError,
    NonFiniteError,
    NonFiniteWarning,
    watch,
)
from tests.support import QUIET
from tests.support.events import (
    hist_at,
    hist_steps,
    histogram_tags,
    read_events,
    scalar_at,
    scalar_tags,
)
from tests.support.hooks import hook_state
from tests.support.training import train
from tests.support.zoo import SeedCNN, seed_cnn_batch, seed_cnn_loss


# =========================================================================== writers
def test_user_writer_is_flushed_not_closed(seed_cnn, logdir):
    writer = SummaryWriter(str(logdir))
    closed = []
    real_close = writer.close
    writer.close = lambda: closed.append(True)
    try:
        with watch(seed_cnn, writer, every=1, **QUIET) as w:
            train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
        assert w.writer is writer
        assert closed == []
        # Flushed: everything is readable while the user's writer is still open.
        acc = read_events(logdir)
        assert hist_steps(acc, "activations/conv1") == [0, 1]
        writer.add_scalar("user/after", 1.0, 5)  # still usable
    finally:
        real_close()
    assert "user/after" in scalar_tags(read_events(logdir))


@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "Path"])
def test_log_directory_writer_is_made_and_closed(seed_cnn, logdir, as_type):
    with watch(seed_cnn, as_type(logdir), every=1, **QUIET) as w:
        assert isinstance(w.writer, SummaryWriter)
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
    assert w.writer.file_writer is None  # torch's SummaryWriter.close() drops its file writer
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/conv1") == [0, 1]


def test_no_writer_logs_under_runs(seed_cnn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with watch(seed_cnn, every=1, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1
    assert hist_steps(read_events(runs[0]), "activations/conv1") == [0]


# =========================================================================== writer-like objects
class RecordingWriter:
    """A SummaryWriter-like object (the shape of tensorboardX's): records what it is asked to write."""

    def __init__(self) -> None:
        self.histograms: dict[tuple[str, int], dict] = {}
        self.scalars: dict[tuple[str, int], float] = {}
        self.texts: list[tuple[str, str, int]] = []
        self.flushed = 0

    def add_histogram_raw(
        self, tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts, global_step=None, **kw
    ):
        assert (tag, global_step) not in self.histograms, (tag, global_step)
        self.histograms[(tag, global_step)] = dict(min=min, max=max, num=num, counts=list(bucket_counts))

    def add_scalar(self, tag, value, global_step=None, **kw):
        self.scalars[(tag, global_step)] = float(value)

    def add_text(self, tag, text, global_step=None, **kw):
        self.texts.append((tag, text, global_step))

    def add_graph(self, model, input_to_model=None, **kw):
        pass

    def add_image(self, tag, img_tensor, global_step=None, **kw):
        pass

    def add_figure(self, tag, figure, global_step=None, **kw):
        pass

    def flush(self):
        self.flushed += 1


def test_writer_like_object_gets_the_same_events(logdir):
    def run(writer):
        torch.manual_seed(0)
        model = SeedCNN()
        with watch(model, writer, every=2, **QUIET):
            train(model, seed_cnn_batch, seed_cnn_loss, 3)

    recorder = RecordingWriter()
    run(recorder)
    assert recorder.flushed >= 1
    run(logdir)
    acc = read_events(logdir)
    expected_hist = {(t, e.step) for t in histogram_tags(acc) for e in acc.Histograms(t)}
    expected_scalars = {(t, e.step) for t in scalar_tags(acc) for e in acc.Scalars(t)}
    assert set(recorder.histograms) == expected_hist
    assert set(recorder.scalars) == expected_scalars
    for (t, step), h in recorder.histograms.items():
        real = hist_at(acc, t, step)
        assert (h["num"], h["min"], h["max"]) == (real.num, real.min, real.max), t
    for (t, step), value in recorder.scalars.items():
        assert value == pytest.approx(scalar_at(acc, t, step), rel=1e-6), t


# =========================================================================== bad input
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(model="x"), ModelTypeError, ["str"]),
        (dict(model=torch.zeros(3)), ModelTypeError, ["Tensor"]),
        (dict(writer=object()), ConfigError, ["object"]),
        (dict(writer=42), ConfigError, ["int"]),
        (dict(every=0), ConfigError, ["every=0"]),
        (dict(every=-3), ConfigError, ["-3"]),
        (dict(every=2.5), ConfigError, ["2.5"]),
        (dict(every=True), ConfigError, ["True"]),
        (dict(check_every=-1), ConfigError, ["-1"]),
        (dict(log=["bogus"]), ConfigError, ["bogus"]),
        (dict(log="weights,grads"), ConfigError, ["weights,grads"]),
        (dict(on_nonfinite="maybe"), ConfigError, ["maybe"]),
        (dict(include="nope*"), ConfigError, ["nope*", "conv1"]),
        (dict(include=42), ConfigError, ["42"]),
        (dict(exclude=[nn.Conv2d, 3.5]), ConfigError, ["3.5"]),
        (dict(optimizer="adam"), ConfigError, ["str"]),
        (dict(evrey=10), TypeError, ["evrey"]),  # an explicit signature: Python (and type checkers) say so
        (dict(thresholds={"dead": 0.9}), ConfigError, ["dead", "dead_fraction"]),
    ],
    ids=[
        "model-str",
        "model-tensor",
        "writer-object",
        "writer-int",
        "every-0",
        "every-negative",
        "every-float",
        "every-bool",
        "check_every-negative",
        "log-bogus",
        "log-comma-string",
        "on_nonfinite-maybe",
        "include-no-match",
        "include-int",
        "exclude-float",
        "optimizer-str",
        "misspelt-option",
        "thresholds-unknown",
    ],
)
def test_bad_input(seed_cnn, tmp_path, kwargs, error, words):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", seed_cnn)
    kwargs.setdefault("writer", tmp_path / "run")
    before = hook_state(seed_cnn)
    with pytest.raises(error) as info:
        watch(model, **kwargs, **QUIET)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert hook_state(seed_cnn) == before
    # Nothing half-done: the model can be watched right away.
    watch(seed_cnn, tmp_path / "ok", **QUIET).close()


def test_error_classes():
    assert issubclass(ModelTypeError, TypeError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(NonFiniteError, FloatingPointError)
    for cls in (ModelTypeError, ConfigError, AlreadyWatchedError, NonFiniteError):
        assert issubclass(cls, introspect.IntrospectError)
    assert issubclass(NonFiniteWarning, IntrospectWarning)

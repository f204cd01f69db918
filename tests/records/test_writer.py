"""The writer thread: a slow or hung writer never stalls training. Logging-step data that does not
fit the bounded queue is dropped, counted and reported; a healthy writer still gets every completed
step by the end of the watch (the event file read back); a hung one is abandoned at close."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary

from introspect import IntrospectWarning, watch
from introspect.records import writer as writer_module
from tests.support import QUIET
from tests.support.events import hist_steps, read_events


class GatedWriter:
    """A SummaryWriter-like object (per-tag calls, like tensorboardX's) over a real SummaryWriter
    whose every call waits for ``gate``: a slow disk (the gate opens later) or a hung one (never)."""

    def __init__(self, logdir, gate: threading.Event) -> None:
        self.inner = SummaryWriter(str(logdir))
        self.gate = gate
        self.calls = 0
        self.threads: set[str] = set()

    def _wait(self) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.gate.wait()

    def add_histogram_raw(self, *args, **kwargs):
        self._wait()
        self.inner.add_histogram_raw(*args, **kwargs)

    def add_scalar(self, *args, **kwargs):
        self._wait()
        self.inner.add_scalar(*args, **kwargs)

    def add_text(self, *args, **kwargs):
        self._wait()
        self.inner.add_text(*args, **kwargs)

    def flush(self):
        self._wait()
        self.inner.flush()


def _train(model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_a_slow_writer_drops_logging_data_counts_it_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "QUEUE_SIZE", 2)
    gate = threading.Event()
    writer = GatedWriter(tmp_path, gate)
    model = _model()
    with pytest.warns(IntrospectWarning, match="slower than training") as caught:
        with watch(model, writer, every=1, **QUIET) as w:
            _train(model, 6)  # would block at the first write without the queue
            assert writer.calls <= 1  # the writer thread is stuck in its first call
            gate.set()  # the disk comes back: the queued writes go out at close
    dropped = w.dropped_writes
    assert dropped > 0
    assert f"{dropped} writes dropped" in w.report()
    assert len([c for c in caught if "is dropped" in str(c.message)]) == 1  # said once, then counted
    assert writer.threads == {"introspect-writer"}  # never on the training thread
    writer.inner.close()
    steps = hist_steps(read_events(tmp_path), "weights/0.weight")
    assert steps and steps == sorted(set(steps)) and len(steps) < 6  # written ones whole, dropped ones absent


def test_close_waits_for_a_healthy_writer_and_writes_every_step(tmp_path):
    gate = threading.Event()
    writer = GatedWriter(tmp_path, gate)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)
        with watch(model, writer, every=1, **QUIET) as w:
            _train(model, 5)
            threading.Timer(0.3, gate.set).start()  # the writer lags, then catches up during close
    assert w.dropped_writes == 0
    writer.inner.close()
    acc = read_events(tmp_path)
    assert hist_steps(acc, "weights/0.weight") == [0, 1, 2, 3, 4]
    assert hist_steps(acc, "activations/2") == [0, 1, 2, 3, 4]


def test_a_hung_writer_is_abandoned_at_close_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "STALL_S", 0.3)
    writer = GatedWriter(tmp_path, threading.Event())  # never opens
    model = _model()
    started = time.monotonic()
    with pytest.warns(IntrospectWarning, match="abandoned"):
        with watch(model, writer, every=1, **QUIET) as w:
            _train(model, 3)
    assert time.monotonic() - started < 10
    assert w.writer is None


def test_the_queue_holds_host_data_only(tmp_path):
    """What waits in the queue is host-side: a step's numbers, CPU copies of images."""
    gate = threading.Event()
    writer = GatedWriter(tmp_path, gate)
    model = _model()
    with watch(model, writer, every=1, **QUIET) as w:
        _train(model, 2)
        guarded = w._writer
        guarded.call("add_scalar", "x", torch.ones((), requires_grad=True) * 2, 0)
        queued = [a for _, args in list(guarded._pending) for a in args]
        values = [
            v for a in queued for v in (a if isinstance(a, tuple) else a.values() if isinstance(a, dict) else [a])
        ]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        assert tensors  # the scalar above waits behind the stuck writes
        assert all(t.device.type == "cpu" and t.grad_fn is None and not t.requires_grad for t in tensors)
        gate.set()


def test_a_live_figure_is_the_same_event_as_summary_writers_add_image(tmp_path, monkeypatch):
    """The writer thread encodes an RGB(A) uint8 image itself (no float round trip): the event
    TensorBoard reads back is the one ``SummaryWriter.add_image`` writes, byte for byte."""
    import torch.utils.tensorboard.writer as tb_writer

    calls = []
    monkeypatch.setattr(tb_writer, "image", lambda *a, **k: calls.append(1) or tb_summary.image(*a, **k))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.integers(0, 256, (20, 31, 4), dtype=np.uint8)]
    theirs = SummaryWriter(str(tmp_path / "theirs"))
    ours = writer_module.GuardedWriter(SummaryWriter(str(tmp_path / "ours")), lambda e: None, True)
    for step, image in enumerate(images):
        theirs.add_image("fig", image, step, dataformats="HWC")
        assert ours.call("add_image", "fig", image, step, dataformats="HWC")
    theirs.close()
    ours.finish()
    expected = [
        (e.step, e.encoded_image_string, e.width, e.height) for e in read_events(tmp_path / "theirs").Images("fig")
    ]
    written = [
        (e.step, e.encoded_image_string, e.width, e.height) for e in read_events(tmp_path / "ours").Images("fig")
    ]
    assert len(written) == len(images) and written == expected
    assert len(calls) == len(images)  # summary.image ran for SummaryWriter's own calls only

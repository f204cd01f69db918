"""What ``watch`` changes in the process, and that it is all undone: two watchers in two threads,
a writer that fails at the first batch, the registry's order, and every exit path."""

from __future__ import annotations

import signal
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

from introspect import ConfigError, ConfigTypeError, IntrospectWarning, watch
from introspect.runtime.registry import ACTIVE, Registry
from tests.support import QUIET
from tests.support.events import hist_steps, read_events
from tests.support.hooks import hook_state


class SmallCNN(nn.Module):
    """Conv, BatchNorm and a linear head: summary, graph, feature maps and buffers all exercised
    (no dropout: two threads draw from torch's one global RNG in no fixed order)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "cnn":
        return SmallCNN()
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def _batches(kind: str, seed: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (4, 3, 12, 12) if kind == "cnn" else (8, 6)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def _train(model: nn.Module, batches: list[torch.Tensor], start: threading.Barrier | None = None) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if start is not None:
        start.wait()
    losses = []
    for x in batches:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_two_models_watched_in_two_threads(tmp_path, trial, capsys):
    stdout, stderr = sys.stdout, sys.stderr
    kinds = ("cnn", "mlp")
    steps = 6
    batches = {k: _batches(k, 10 + i, steps) for i, k in enumerate(kinds)}
    models = {k: _model(k, i) for i, k in enumerate(kinds)}
    twins = {k: _model(k, i) for i, k in enumerate(kinds)}
    losses: dict[str, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(kinds))

    def run(kind: str) -> None:
        try:
            with watch(models[kind], tmp_path / kind, every=2, summary=True, graph=True):
                losses[kind] = _train(models[kind], batches[kind], start)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in kinds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntrospectWarning)
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert sys.stdout is stdout and sys.stderr is stderr  # nothing process-global left swapped
    printed = capsys.readouterr().out
    assert printed.count("Total params") == 2  # both summaries printed, neither lost
    for kind in kinds:
        twin_losses = _train(twins[kind], batches[kind])
        assert all(torch.equal(a, b) for a, b in zip(losses[kind], twin_losses)), kind
        for (name, a), b in zip(models[kind].state_dict().items(), twins[kind].state_dict().values()):
            assert torch.equal(a, b), (kind, name)
        assert hook_state(models[kind]) == hook_state(twins[kind])
        acc = read_events(tmp_path / kind)
        first = "activations/conv" if kind == "cnn" else "activations/0"
        assert hist_steps(acc, first) == [0, 2, 4]
        assert acc.Graph() is not None
        assert "model/summary/text_summary" in acc.Tags()["tensors"]
    assert not ACTIVE


class FailingWriter:
    """A SummaryWriter-like object whose disk is full from the start."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args, **kwargs):
        self.calls += 1
        raise OSError(28, "No space left on device")

    add_scalar = add_histogram_raw = add_text = add_image = add_graph = flush = _fail


def test_a_writer_that_fails_at_the_first_batch_disables_writing_and_training_goes_on():
    model, twin = _model("mlp", 0), _model("mlp", 0)
    before = hook_state(model)
    batches = _batches("mlp", 1, 4)
    writer = FailingWriter()
    with pytest.warns(IntrospectWarning, match="No space left on device") as caught:
        with watch(model, writer, every=1, summary=True, graph=False) as w:
            losses = _train(model, batches)
    failures = [c for c in caught if "<writer>" in str(c.message)]
    assert len(failures) == 1  # one warning, then no more writing
    assert w.writer is None
    assert writer.calls <= 2  # the failing call, and the final flush at most
    assert all(torch.equal(a, b) for a, b in zip(losses, _train(twin, batches)))
    assert hook_state(model) == before


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(writer=42), ConfigTypeError, "writer must be a SummaryWriter"),
        (dict(log=None), ConfigTypeError, "log= takes"),
        (dict(log=42), ConfigTypeError, "log= takes"),
        (dict(log=["weights", 3]), ConfigTypeError, "strings"),
        (dict(every="10"), ConfigTypeError, "every must be an integer"),
        (dict(summary="yes"), ConfigTypeError, "summary= takes True or False"),
        (dict(step_fn=7), ConfigTypeError, "step_fn must be a callable"),
    ],
)
def test_option_types_are_type_errors_raised_before_any_hook(tmp_path, options, error, words):
    model = _model("mlp", 0)
    before = hook_state(model)
    writer = options.pop("writer", tmp_path / "run")
    with pytest.raises(error, match=words) as info:
        watch(model, writer, **options)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
    assert hook_state(model) == before
    assert not ACTIVE


def test_the_registry_undoes_last_first_once_even_when_one_undo_fails():
    done = []
    registry = Registry()
    registry.add("first", lambda: done.append("first"))
    registry.add("broken", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    registry.add("last", lambda: done.append("last"))
    with pytest.warns(IntrospectWarning, match="could not undo broken"):
        registry.undo()
    assert done == ["last", "first"]
    registry.undo()  # idempotent
    assert done == ["last", "first"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signal_handlers_are_restored_on_every_exit_path(tmp_path):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    model = _model("mlp", 0)
    with watch(model, tmp_path / "a", **QUIET):
        assert signal.getsignal(signal.SIGINT) is not previous[signal.SIGINT]
        _train(model, _batches("mlp", 0, 1))
    assert {s: signal.getsignal(s) for s in previous} == previous
    with pytest.raises(ZeroDivisionError):
        with watch(model, tmp_path / "b", **QUIET):
            _ = 1 / 0
    assert {s: signal.getsignal(s) for s in previous} == previous
    w = watch(model, tmp_path / "c", **QUIET)
    w.close()
    w.close()
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert not [t for t in threading.enumerate() if t.name == "introspect-signal-watchdog"]

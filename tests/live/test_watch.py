"""watch(): hooks, the step clock, the tags it writes, teardown, and that training never notices."""

from __future__ import annotations

import gc
import math
import signal
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
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
    tags_with_prefix,
    text_of,
)
from tests.support.hooks import count_hooks, hook_state
from tests.support.training import assert_same_losses, assert_same_state, make_optimizer, train
from tests.support.zoo import SEED_CNN_MODULES, ZOO, SeedCNN, ZooCase, seed_cnn_batch, seed_cnn_loss

# Output shapes of the seed CNN's modules for a 2 x 3 x 32 x 32 batch, worked out by hand:
# 32 -conv3-> 30 -pool2-> 15 -conv5-> 11 -pool2-> 5 -adaptive-> 1.
SEED_CNN_OUTPUT_SHAPES = {
    "conv1": (2, 32, 30, 30),
    "pool1": (2, 32, 15, 15),
    "conv2": (2, 64, 11, 11),
    "pool2": (2, 64, 5, 5),
    "dropout": (2, 64, 5, 5),
    "adaptive_pool": (2, 64, 1, 1),
    "flatten": (2, 64),
    "linear1": (2, 32),
    "relu": (2, 32),
    "linear2": (2, 1),
}
SEED_CNN_PARAM_SHAPES = {
    "conv1.weight": (32, 3, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 5, 5),
    "conv2.bias": (64,),
    "linear1.weight": (32, 64),
    "linear1.bias": (32,),
    "linear2.weight": (1, 32),
    "linear2.bias": (1,),
}


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# =========================================================================== tags and steps
def test_seed_cnn_exact_tags_and_steps(seed_cnn, writer, logdir):
    weights_at: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(step: int) -> None:
        weights_at[step] = {n: p.detach().clone() for n, p in seed_cnn.named_parameters()}

    snapshot(0)
    with watch(seed_cnn, writer, every=2, **QUIET) as w:
        # weights_at[k] = the weights step k's forward uses (captured after step k-1's update).
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 5, after_step=lambda i: snapshot(i + 1))
        assert w.step == 4
    acc = read_events(logdir)

    params = list(SEED_CNN_PARAM_SHAPES)
    assert w.module_names == list(SEED_CNN_MODULES)
    assert w.parameter_names == params
    expected_hist = (
        {f"activations/{m}" for m in SEED_CNN_MODULES}
        | {f"activation_grads/{m}" for m in SEED_CNN_MODULES}
        | {f"weights/{p}" for p in params}
        | {f"grads/{p}" for p in params}
    )
    assert histogram_tags(acc) == expected_hist
    assert scalar_tags(acc) == {f"grad_norm/{p}" for p in params}
    assert acc.Tags()["tensors"] == []  # summary=False: no text
    assert not acc.Tags()["graph"]
    for t in expected_hist:
        assert hist_steps(acc, t) == [0, 2, 4], t
    for t in scalar_tags(acc):
        assert [e.step for e in acc.Scalars(t)] == [0, 2, 4], t

    # num is the tensor's numel (every value finite), for activations, their gradients and weights.
    for step in (0, 2, 4):
        for m, shape in SEED_CNN_OUTPUT_SHAPES.items():
            assert hist_at(acc, f"activations/{m}", step).num == numel(shape), m
            assert hist_at(acc, f"activation_grads/{m}", step).num == numel(shape), m
        for p, shape in SEED_CNN_PARAM_SHAPES.items():
            assert hist_at(acc, f"weights/{p}", step).num == numel(shape), p
            assert hist_at(acc, f"grads/{p}", step).num == numel(shape), p

    # Weights at step k are the values step k's forward used: exact min/max, sum to float tolerance.
    for step in (0, 2, 4):
        for p in params:
            h = hist_at(acc, f"weights/{p}", step)
            real = weights_at[step][p]
            assert h.min == real.min().item(), (p, step)
            assert h.max == real.max().item(), (p, step)
            assert h.sum == pytest.approx(real.double().sum().item(), rel=1e-4, abs=1e-4)
            assert sum(h.bucket) == pytest.approx(real.numel())
    # ... and not the values of another step.
    assert hist_at(acc, "weights/conv2.weight", 2).max != weights_at[0]["conv2.weight"].max().item()


def test_grads_and_grad_norm_match_the_real_gradients(seed_cnn, writer, logdir):
    opt = torch.optim.SGD(seed_cnn.parameters(), lr=0.1)
    outputs = {}

    def keep(module, args, out):
        outputs.setdefault("linear2", out.detach().clone())

    seed_cnn.linear2.register_forward_hook(keep)
    with watch(seed_cnn, writer, every=1, **QUIET):
        x, y = seed_cnn_batch()
        loss = seed_cnn_loss(seed_cnn(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in seed_cnn.named_parameters()}
        opt.step()
    acc = read_events(logdir)
    for name, g in grads.items():
        assert scalar_at(acc, f"grad_norm/{name}", 0) == pytest.approx(g.norm().item(), rel=1e-5), name
        h = hist_at(acc, f"grads/{name}", 0)
        assert h.num == g.numel()
        assert h.min == g.min().item()
        assert h.max == g.max().item()
        assert h.sum == pytest.approx(g.double().sum().item(), rel=1e-4, abs=1e-6)
    # The gradient of an MSE loss w.r.t. the output is 2 (out - y) / N.
    expected = 2 * (outputs["linear2"] - y) / y.numel()
    h = hist_at(acc, "activation_grads/linear2", 0)
    assert h.num == 2
    assert h.min == pytest.approx(expected.min().item(), rel=1e-6)
    assert h.max == pytest.approx(expected.max().item(), rel=1e-6)


def test_gradient_hooks_only_on_logging_steps(seed_cnn, writer, logdir):
    """Off-cadence steps attach no output-gradient hook and no parameter hook (with the non-finite
    check, the one thing that runs every step, turned off)."""
    seen = []
    with watch(seed_cnn, writer, every=2, check_every=0, **QUIET):
        # Registered after watch's own hook, so it sees the output after watch handled it.
        def spy(module, args, out):
            param_hooks = any(getattr(p, "_post_accumulate_grad_hooks", None) for p in seed_cnn.parameters())
            seen.append((bool(out._backward_hooks), param_hooks))

        handle = seed_cnn.conv1.register_forward_hook(spy)
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 5)
        handle.remove()
    assert seen == [(True, True), (False, False), (True, True), (False, False), (True, True)]
    acc = read_events(logdir)
    assert hist_steps(acc, "activation_grads/conv1") == [0, 2, 4]
    assert hist_steps(acc, "grads/conv1.weight") == [0, 2, 4]


def test_activation_grads_only_on_logging_steps_with_checks_on(seed_cnn, writer, logdir):
    with watch(seed_cnn, writer, every=2, check_every=1, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 5)
    acc = read_events(logdir)
    for m in SEED_CNN_MODULES:
        assert hist_steps(acc, f"activation_grads/{m}") == [0, 2, 4], m
    for p in SEED_CNN_PARAM_SHAPES:
        assert hist_steps(acc, f"grads/{p}") == [0, 2, 4], p
        assert [e.step for e in acc.Scalars(f"grad_norm/{p}")] == [0, 2, 4], p


def test_step_counts_training_forwards_from_zero(seed_cnn, writer):
    steps = []
    with watch(seed_cnn, writer, every=3, **QUIET) as w:
        assert w.step == 0
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 7, after_step=lambda i: steps.append(w.step))
    assert steps == list(range(7))
    assert w.step == 6


def test_step_zero_always_logs(seed_cnn, writer, logdir):
    with watch(seed_cnn, writer, every=1000, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 3)
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/conv1") == [0]
    assert hist_steps(acc, "weights/conv1.weight") == [0]
    assert hist_steps(acc, "grads/conv1.weight") == [0]


@pytest.mark.parametrize(
    "kinds, present, absent",
    [
        (("weights",), {"weights/"}, {"activations/", "activation_grads/", "grads/", "grad_norm/"}),
        ("grads", {"grads/", "grad_norm/"}, {"activations/", "activation_grads/", "weights/"}),
        (("activations",), {"activations/"}, {"activation_grads/", "weights/", "grads/", "grad_norm/"}),
        (["activation_grads", "weights"], {"activation_grads/", "weights/"}, {"activations/", "grads/"}),
    ],
    ids=["weights", "grads-str", "activations", "act-grads+weights"],
)
def test_log_selects_what_is_written(seed_cnn, writer, logdir, kinds, present, absent):
    with watch(seed_cnn, writer, every=1, log=kinds, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
    acc = read_events(logdir)
    for prefix in present:
        assert tags_with_prefix(acc, prefix), prefix
    for prefix in absent:
        assert not tags_with_prefix(acc, prefix), prefix


def test_module_that_never_runs_logs_nothing(writer, logdir):
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partial()
    with watch(model, writer, every=1, **QUIET):
        train(model, lambda: (torch.randn(3, 4), torch.randn(3, 2)), F.mse_loss, 2)
    acc = read_events(logdir)
    assert "activations/used" in histogram_tags(acc)
    assert not tags_with_prefix(acc, "activations/unused")
    assert not tags_with_prefix(acc, "activation_grads/unused")
    assert not tags_with_prefix(acc, "grads/unused")  # a parameter without a gradient is skipped
    assert not tags_with_prefix(acc, "grad_norm/unused")
    assert "grads/used.weight" in histogram_tags(acc)


# =========================================================================== eval / no_grad
def test_eval_and_no_grad_passes_are_not_steps(seed_cnn, writer, logdir):
    big = torch.randn(5, 3, 32, 32)
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        seed_cnn.eval()
        seed_cnn(big)  # before the first training step: nothing happens
        assert w.step == 0
        seed_cnn.train()
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
        assert w.step == 1
        seed_cnn.eval()
        seed_cnn(big)
        with torch.no_grad():
            seed_cnn(big)
        seed_cnn.train()
        with torch.no_grad():
            seed_cnn(big)
        with torch.inference_mode():
            seed_cnn(big)
        assert w.step == 1
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
        assert w.step == 2
    acc = read_events(logdir)
    for t in histogram_tags(acc):
        assert hist_steps(acc, t) == [0, 1, 2], t
    # The batch-of-5 passes added nothing to any step's histograms.
    for step in (0, 1, 2):
        assert hist_at(acc, "activations/linear2", step).num == 2
        assert hist_at(acc, "activations/conv1", step).num == 2 * 32 * 30 * 30


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


# =========================================================================== teardown
def _check_hooks_attached(model, before, optimizer=None):
    during = hook_state(model, optimizer)
    assert count_hooks(during) > count_hooks(before), "watch attached no hooks"


def test_hooks_removed_after_normal_exit(seed_cnn, writer):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, **QUIET):
        _check_hooks_attached(seed_cnn, before)
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2, optimizer=opt)
    assert hook_state(seed_cnn, opt) == before


def test_hooks_removed_after_normal_exit_optimizer_mode(seed_cnn, writer):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, optimizer=opt, **QUIET):
        during = hook_state(seed_cnn, opt)
        assert during[("optimizer", "pre")] and during[("optimizer", "post")]
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2, optimizer=opt)
    assert hook_state(seed_cnn, opt) == before


def test_hooks_removed_mid_step(seed_cnn, writer):
    """Leaving between forward and backward of a logging step: the step's own hooks go too."""
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, **QUIET):
        x, y = seed_cnn_batch()
        out = seed_cnn(x)
        assert any(getattr(p, "_post_accumulate_grad_hooks", None) for p in seed_cnn.parameters())
    assert hook_state(seed_cnn, opt) == before
    seed_cnn_loss(out, y).backward()  # the output-gradient hooks left on this graph are inert
    assert all(p.grad is not None for p in seed_cnn.parameters())


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
def test_hooks_removed_and_steps_on_disk_after_exception_in_block(seed_cnn, writer, logdir, exc_type):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with pytest.raises(exc_type):
        with watch(seed_cnn, writer, every=1, optimizer=None, **QUIET):
            _check_hooks_attached(seed_cnn, before)
            train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 3, optimizer=opt)
            raise exc_type("stop")
    assert hook_state(seed_cnn, opt) == before
    # Every completed step is on disk.
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/conv1") == [0, 1, 2]
    assert hist_steps(acc, "grads/conv1.weight") == [0, 1, 2]
    # And the model can be watched again.
    with watch(seed_cnn, writer, every=1, **QUIET) as w2:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert w2.step == 0


class Boom(nn.Module):
    """Raises from inside the forward when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.exc: type[BaseException] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exc is not None:
            raise self.exc("boom")
        return x


def _boom_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), Boom(), nn.ReLU(), nn.Linear(8, 1))


def _vec_batch():
    return torch.randn(3, 4), torch.randn(3, 1)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
def test_exception_inside_forward(writer, logdir, exc_type):
    model = _boom_model()
    opt = make_optimizer(model)
    before = hook_state(model, opt)
    with pytest.raises(exc_type):
        with watch(model, writer, every=1, **QUIET) as w:
            train(model, _vec_batch, F.mse_loss, 2, optimizer=opt)
            model[1].exc = exc_type
            try:
                model(torch.randn(3, 4))
            except exc_type:
                pass
            model[1].exc = None
            # Training goes on under the same watcher: the failed forward was step 2.
            train(model, _vec_batch, F.mse_loss, 1, optimizer=opt)
            assert w.step == 3
            model[1].exc = exc_type
            model(torch.randn(3, 4))
    assert hook_state(model, opt) == before
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/3") == [0, 1, 3]
    assert hist_steps(acc, "grads/3.weight") == [0, 1, 3]
    model[1].exc = None
    with watch(model, writer, every=1, **QUIET) as w2:
        train(model, _vec_batch, F.mse_loss, 2, optimizer=opt)
    assert w2.step == 1


def test_user_forward_hook_keeps_firing(seed_cnn, writer):
    calls = []
    handle = seed_cnn.conv1.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    with watch(seed_cnn, writer, every=1, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
        assert len(calls) == 2
    train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert len(calls) == 3
    assert handle.id in seed_cnn.conv1._forward_hooks
    handle.remove()
    assert not seed_cnn.conv1._forward_hooks


def test_close_is_idempotent_and_works_without_with(seed_cnn, writer, logdir):
    before = hook_state(seed_cnn)
    w = watch(seed_cnn, writer, every=1, **QUIET)
    _check_hooks_attached(seed_cnn, before)
    train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
    w.close()
    assert hook_state(seed_cnn) == before
    w.close()
    with w:  # entering a closed watcher and leaving it again is harmless
        pass
    assert hook_state(seed_cnn) == before
    assert hist_steps(read_events(logdir), "activations/conv1") == [0, 1]


def test_second_watch_is_an_error_until_the_first_closes(seed_cnn, writer):
    before = hook_state(seed_cnn)
    with watch(seed_cnn, writer, **QUIET):
        during = hook_state(seed_cnn)
        with pytest.raises(AlreadyWatchedError, match="already being watched"):
            watch(seed_cnn, writer, **QUIET)
        assert hook_state(seed_cnn) == during  # the refused watch attached nothing
        with pytest.raises(AlreadyWatchedError):
            watch(nn.DataParallel(seed_cnn), writer, **QUIET)  # the same model under a wrapper
    assert hook_state(seed_cnn) == before
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert w.step == 0


def test_model_is_released_after_close(tmp_path):
    torch.manual_seed(0)
    model = SeedCNN()
    ref = weakref.ref(model)
    with watch(model, tmp_path / "run", every=1):  # summary and graph on: torchinfo caches models
        train(model, seed_cnn_batch, seed_cnn_loss, 1)
    del model
    gc.collect()
    assert ref() is None, "something still holds the model after the watch closed"


# =========================================================================== numerics
class BNCNN(nn.Module):
    """BatchNorm (running stats), Dropout (RNG) and in-place ReLU: what a watcher could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _bn_batch():
    return torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))


def _run_bn_cnn(logdir: Path | None, steps: int, optimizer_mode: bool, make_opt):
    torch.manual_seed(1234)
    model = BNCNN()
    opt = make_opt(model)
    if logdir is None:
        losses = train(model, _bn_batch, F.cross_entropy, steps, optimizer=opt)
    else:
        with watch(model, logdir, every=1, optimizer=opt if optimizer_mode else None, summary=True, graph=True):
            losses = train(model, _bn_batch, F.cross_entropy, steps, optimizer=opt)
    grads = [p.grad.clone() for p in model.parameters()]
    after = torch.rand(3)  # the global RNG stream continues identically
    return model, losses, grads, after


@pytest.mark.parametrize("optimizer_mode", [False, True], ids=["forward-steps", "optimizer-steps"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    ],
    ids=["sgd", "adam"],
)
def test_training_is_bitwise_unchanged(tmp_path, capsys, optimizer_mode, make_opt):
    bare_model, bare_losses, bare_grads, bare_after = _run_bn_cnn(None, 20, optimizer_mode, make_opt)
    model, losses, grads, after = _run_bn_cnn(tmp_path / "run", 20, optimizer_mode, make_opt)
    assert "Total params" in capsys.readouterr().out  # the summary did run
    assert read_events(tmp_path / "run").Tags()["graph"]  # and so did the graph
    assert_same_losses(bare_losses, losses)
    assert_same_state(bare_model, model)  # weights and BN running stats / num_batches_tracked
    for a, b in zip(bare_grads, grads):
        assert torch.equal(a, b)
    assert torch.equal(bare_after, after)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in ZOO])
def test_zoo(case: ZooCase, tmp_path):
    steps = 3
    torch.manual_seed(0)
    bare = case.build_model()
    bare_losses = train(bare, case.make_input, case.loss_fn, steps, optimizer=make_optimizer(bare))

    torch.manual_seed(0)
    model = case.build_model()
    opt = make_optimizer(model)
    before = hook_state(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)  # no probe may fail on any zoo model
        with watch(model, tmp_path / "run", every=1, **QUIET) as w:
            losses = train(model, case.make_input, case.loss_fn, steps, optimizer=opt)
    assert hook_state(model, opt) == before
    assert_same_losses(bare_losses, losses)
    assert_same_state(bare, model)
    assert w.step == steps - 1
    assert [a for a in w.alerts if a.kind == "nonfinite"] == []

    acc = read_events(tmp_path / "run")
    hists = histogram_tags(acc)
    for name in case.activations:
        assert f"activations/{name}" in hists, name
        assert hist_steps(acc, f"activations/{name}") == list(range(steps)), name
    for name in case.activation_grads:
        assert hist_steps(acc, f"activation_grads/{name}") == list(range(steps)), name
        for step in range(steps):
            assert (
                hist_at(acc, f"activation_grads/{name}", step).num == hist_at(acc, f"activations/{name}", step).num
            ), (name, step)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in trainable:
        assert hist_steps(acc, f"grads/{name}") == list(range(steps)), name
        assert hist_steps(acc, f"weights/{name}") == list(range(steps)), name
        assert f"grad_norm/{name}" in scalar_tags(acc), name
    for name in case.frozen:
        assert f"weights/{name}" not in hists
        assert f"grads/{name}" not in hists
        assert f"grad_norm/{name}" not in scalar_tags(acc)
    # No tag of a multi-output module is left without its suffix, and no nonfinite counts.
    assert not tags_with_prefix(acc, "nonfinite/")


def test_shared_module_calls_are_merged(writer, logdir):
    from tests.support.zoo import SharedLinear

    torch.manual_seed(0)
    model = SharedLinear()
    outs = []

    def keep(module, args, out):
        outs.append(out.detach().clone())

    model.shared.register_forward_hook(keep)
    with watch(model, writer, every=1, **QUIET):
        x, y = torch.randn(4, 8), torch.randn(4, 2)
        F.mse_loss(model(x), y).backward()
    acc = read_events(logdir)
    h = hist_at(acc, "activations/shared", 0)
    both = torch.cat([o.reshape(-1) for o in outs])
    assert len(outs) == 2
    assert h.num == 2 * 4 * 8
    assert h.min == both.min().item()
    assert h.max == both.max().item()
    assert sum(h.bucket) == pytest.approx(64)
    assert h.sum == pytest.approx(both.double().sum().item(), rel=1e-5, abs=1e-5)
    assert hist_at(acc, "activation_grads/shared", 0).num == 2 * 4 * 8


def test_lstm_tuple_output_tags(writer, logdir):
    from tests.support.zoo import LSTMNet

    torch.manual_seed(0)
    model = LSTMNet()
    with watch(model, writer, every=1, **QUIET):
        train(model, lambda: (torch.randn(2, 5, 8), torch.randn(2, 1)), F.mse_loss, 1)
    acc = read_events(logdir)
    assert {t for t in histogram_tags(acc) if t.startswith("activations/lstm")} == {
        "activations/lstm/0",
        "activations/lstm/1/0",
        "activations/lstm/1/1",
    }
    assert hist_at(acc, "activations/lstm/0", 0).num == 2 * 5 * 16
    assert hist_at(acc, "activations/lstm/1/0", 0).num == 1 * 2 * 16
    assert "activation_grads/lstm/0" in histogram_tags(acc)


def test_bare_lstm_root_is_tagged_model(writer, logdir):
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, batch_first=True)
    with watch(lstm, writer, every=1, **QUIET) as w:
        out, (h, c) = lstm(torch.randn(2, 5, 8))
        out.sum().backward()
    assert w.module_names == ["model"]
    acc = read_events(logdir)
    assert {t for t in histogram_tags(acc) if t.startswith("activations/")} == {
        "activations/model/0",
        "activations/model/1/0",
        "activations/model/1/1",
    }
    assert "weights/weight_ih_l0" in histogram_tags(acc)
    assert "grads/weight_hh_l0" in histogram_tags(acc)


# =========================================================================== optimizer=
def test_optimizer_mode_with_gradient_accumulation(seed_cnn, writer, logdir):
    opt = torch.optim.SGD(seed_cnn.parameters(), lr=0.05)
    seen_steps, grad_norms, ratios, weights_at = [], {}, {}, {}
    with watch(seed_cnn, writer, every=1, optimizer=opt, **QUIET) as w:
        for k in range(3):
            opt.zero_grad()
            weights_at[k] = {n: p.detach().clone() for n, p in seed_cnn.named_parameters()}
            for _ in range(2):
                x, y = seed_cnn_batch()
                (seed_cnn_loss(seed_cnn(x), y) / 2).backward()
                seen_steps.append(w.step)
            grad_norms[k] = {n: p.grad.norm().item() for n, p in seed_cnn.named_parameters()}
            opt.step()
            ratios[k] = {
                n: ((p.detach() - weights_at[k][n]).norm() / weights_at[k][n].norm()).item()
                for n, p in seed_cnn.named_parameters()
            }
        assert w.step == 2
    assert seen_steps == [0, 0, 1, 1, 2, 2]
    acc = read_events(logdir)
    for t in histogram_tags(acc):
        assert hist_steps(acc, t) == [0, 1, 2], t
    params = list(SEED_CNN_PARAM_SHAPES)
    assert {t for t in scalar_tags(acc) if t.startswith("update_ratio/")} == {f"update_ratio/{p}" for p in params}
    for k in range(3):
        # Two forwards per step, merged: twice the per-forward numel.
        for m, shape in SEED_CNN_OUTPUT_SHAPES.items():
            assert hist_at(acc, f"activations/{m}", k).num == 2 * numel(shape), m
            assert hist_at(acc, f"activation_grads/{m}", k).num == 2 * numel(shape), m
        for p, shape in SEED_CNN_PARAM_SHAPES.items():
            assert hist_at(acc, f"grads/{p}", k).num == numel(shape)  # the accumulated gradient, once
            assert hist_at(acc, f"weights/{p}", k).num == numel(shape)
            assert hist_at(acc, f"weights/{p}", k).max == weights_at[k][p].max().item()
            assert scalar_at(acc, f"grad_norm/{p}", k) == pytest.approx(grad_norms[k][p], rel=1e-5)
            ratio = scalar_at(acc, f"update_ratio/{p}", k)
            assert ratio > 0
            assert ratio == pytest.approx(ratios[k][p], rel=1e-4)


def test_optimizer_mode_cadence_and_bare_optimizer_steps(seed_cnn, writer, logdir):
    opt = torch.optim.SGD(seed_cnn.parameters(), lr=0.01)
    with watch(seed_cnn, writer, every=2, optimizer=opt, **QUIET) as w:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 5, optimizer=opt)
        assert w.step == 4
        opt.step()  # a step without a forward is still a step
        assert w.step == 5
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1, optimizer=opt)
        assert w.step == 6
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/conv1") == [0, 2, 4, 6]
    assert [e.step for e in acc.Scalars("update_ratio/conv1.weight")] == [0, 2, 4, 6]


# =========================================================================== NaN / Inf
class Poison(nn.Module):
    """Writes ``value`` into column 0 of its input at the chosen steps. The training loop says
    which step it is (:func:`at_step`), so the fault belongs to the step, as a bad batch's would:
    a replay of the step meets it again."""

    def __init__(self, at: set[int], value: float = float("nan")) -> None:
        super().__init__()
        self.at = set(at)
        self.value = value
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.at:
            x = x.clone()
            x[:, 0] = self.value
        return x


def at_step(model: nn.Module, step: int) -> None:
    """Tell the model's poisons which training step this is."""
    for module in model.modules():
        if isinstance(module, Poison):
            module.step = step


class PoisonNet(nn.Module):
    def __init__(self, at: set[int], value: float = float("nan")) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 8)
        self.poison = Poison(at, value)
        self.lin2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.poison(self.lin1(x)))


def _poison_steps(model: nn.Module, steps: int, opt: torch.optim.Optimizer | None = None) -> None:
    """Train, skipping the update when the loss is not finite (so the weights stay finite)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        at_step(model, step)
        loss = model(torch.randn(2, 4)).mean()
        opt.zero_grad()
        loss.backward()
        if torch.isfinite(loss):
            opt.step()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_is_counted_histogrammed_and_located(writer, logdir, value):
    torch.manual_seed(0)
    model = PoisonNet(at={1}, value=value)
    seen = {}

    def keep(module, args, out):
        seen[module.step] = out.detach().clone()

    model.poison.register_forward_hook(keep)
    with pytest.warns(NonFiniteWarning) as record:
        with watch(model, writer, every=1, **QUIET) as w:
            _poison_steps(model, 3)
    assert len([r for r in record if issubclass(r.category, NonFiniteWarning)]) == 1
    assert len(w.alerts) == 1
    alert = w.alerts[0]
    assert alert.kind == "nonfinite"
    assert alert.where == "poison"  # the origin, not lin2 downstream of it
    assert alert.step == 1
    assert "poison" in w.report()

    acc = read_events(logdir)
    # The count of non-finite values, only where (and when) there are some.
    assert [e.step for e in acc.Scalars("nonfinite/poison")] == [1]
    assert scalar_at(acc, "nonfinite/poison", 1) == 2  # 2 rows x column 0
    assert scalar_at(acc, "nonfinite/lin2", 1) == 2 * 3  # everything downstream
    assert "nonfinite/lin1" not in scalar_tags(acc)
    # The finite values are still histogrammed.
    out = seen[1]
    finite = out[torch.isfinite(out)]
    h = hist_at(acc, "activations/poison", 1)
    assert h.num == out.numel() - 2 == finite.numel()
    assert h.min == finite.min().item()
    assert h.max == finite.max().item()
    assert sum(h.bucket) == pytest.approx(finite.numel())
    assert hist_steps(acc, "activations/poison") == [0, 1, 2]
    assert hist_steps(acc, "activations/lin2") == [0, 2]  # nothing finite at step 1
    assert hist_steps(acc, "activations/lin1") == [0, 1, 2]
    # The finding is written for TensorBoard too.
    texts = text_of(acc, "diagnostics/alerts")
    assert texts and "poison" in texts[-1]


def test_nonfinite_warns_once_per_origin(writer):
    torch.manual_seed(0)
    model = PoisonNet(at={1, 2, 3})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, writer, every=1, **QUIET) as w:
            _poison_steps(model, 5)
    nonfinite = [r for r in record if issubclass(r.category, NonFiniteWarning)]
    assert len(nonfinite) == 1
    assert "poison" in str(nonfinite[0].message)
    assert {a.where for a in w.alerts} == {"poison"}
    assert w.alerts[0].step == 1


def test_nonfinite_raise_at_the_end_of_that_backward(writer, logdir):
    """Without optimizer=, the check runs when backward finishes: the user's next line (usually
    optimizer.step()) never runs with NaN gradients."""
    torch.manual_seed(0)
    model = PoisonNet(at={1})
    before = hook_state(model)
    phases = []
    with pytest.raises(NonFiniteError) as info:
        with watch(model, writer, every=1, on_nonfinite="raise", **QUIET) as w:
            for i in range(4):
                at_step(model, i)
                loss = model(torch.randn(2, 4)).mean()
                phases.append((i, "backward"))
                loss.backward()
                phases.append((i, "done"))
    assert isinstance(info.value, FloatingPointError)
    assert phases[-1] == (1, "backward")
    assert info.value.alert.where == "poison"
    assert info.value.alert.step == 1
    assert info.value.alert.phase == "forward"
    assert "poison" in str(info.value)
    assert w.step == 1
    assert hook_state(model) == before
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/lin1") == [0, 1]


def test_nonfinite_raise_not_on_exit(writer):
    """A step with no backward is checked when it ends; on exit that records, never raises."""
    torch.manual_seed(0)
    model = PoisonNet(at={2})
    before = hook_state(model)
    with watch(model, writer, every=1, on_nonfinite="raise", **QUIET) as w:
        for step in range(2):
            at_step(model, step)
            model(torch.randn(2, 4)).mean().backward()
        at_step(model, 2)
        model(torch.randn(2, 4))  # step 2: forward only, NaN in poison
    assert [(a.where, a.step) for a in w.alerts] == [("poison", 2)]
    assert hook_state(model) == before


def test_nonfinite_raise_stops_before_the_weights_change(writer):
    torch.manual_seed(0)
    model = PoisonNet(at={1})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_state(model, opt)
    phases = []
    weights_after_step0 = None
    with pytest.raises(NonFiniteError) as info:
        with watch(model, writer, every=1, optimizer=opt, on_nonfinite="raise", **QUIET):
            for i in range(3):
                phases.append((i, "forward"))
                at_step(model, i)
                loss = model(torch.randn(2, 4)).mean()
                opt.zero_grad()
                phases.append((i, "backward"))
                loss.backward()
                phases.append((i, "step"))
                opt.step()
                phases.append((i, "done"))
                if i == 0:
                    weights_after_step0 = {k: v.clone() for k, v in model.state_dict().items()}
    assert phases[-1] == (1, "backward")
    assert info.value.alert.where == "poison"
    assert info.value.alert.step == 1
    assert hook_state(model, opt) == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights_after_step0[k]), k


def test_nonfinite_ignore(writer):
    torch.manual_seed(0)
    model = PoisonNet(at={1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch(model, writer, every=1, on_nonfinite="ignore", **QUIET):
            _poison_steps(model, 3)


@pytest.mark.parametrize("check_every, found", [(0, []), (2, [("poison", 2)])], ids=["off", "every-2"])
def test_check_every(writer, check_every, found):
    torch.manual_seed(0)
    model = PoisonNet(at={1, 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=1, check_every=check_every, **QUIET) as w:
            _poison_steps(model, 3)
    assert [(a.where, a.step) for a in w.alerts] == found


class NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class GradPoison(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NaNGrad.apply(x)


def test_nonfinite_gradient_is_found_in_backward(writer, logdir):
    """DESIGN: the origin is the first module whose forward output, or in backward whose gradient,
    holds NaN/Inf. Here the forward is clean and the gradient of lin1's output is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin1", nn.Linear(4, 8))
    model.add_module("gradpoison", GradPoison())
    model.add_module("lin2", nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=1, **QUIET) as w:
            model(torch.randn(2, 4)).mean().backward()
            model(torch.randn(2, 4))  # the next step ends step 0
    acc = read_events(logdir)
    assert scalar_at(acc, "nonfinite/lin1", 0) > 0  # activation_grads/lin1 is all NaN
    assert scalar_at(acc, "nonfinite/lin1.weight", 0) > 0
    assert [a.step for a in w.alerts if a.kind == "nonfinite"] == [0], w.alerts
    assert w.alerts[0].where in ("lin1", "gradpoison")


# =========================================================================== odd outputs
class ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


class ReturnsNone(nn.Module):
    def forward(self, x):
        return None


class Mask(nn.Module):
    def forward(self, x):
        return x > 0, x.long()


class OddOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 4)
        self.argmax = ArgMax()
        self.nothing = ReturnsNone()
        self.mask = Mask()

    def forward(self, idx):
        h = self.lin(self.emb(idx))
        self.argmax(h)
        self.nothing(h)
        self.mask(h)
        return h


def test_non_float_outputs_are_skipped_quietly(writer, logdir):
    torch.manual_seed(0)
    model = OddOutputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch(model, writer, every=1, **QUIET) as w:
            train(model, lambda: (torch.randint(0, 10, (3, 5)), torch.randn(3, 5, 4)), F.mse_loss, 2)
    assert [a for a in w.alerts if a.kind == "nonfinite"] == []
    acc = read_events(logdir)
    hists = histogram_tags(acc)
    assert "activations/emb" in hists
    assert "activations/lin" in hists
    assert "grads/emb.weight" in hists
    for name in ("argmax", "nothing", "mask"):
        assert not tags_with_prefix(acc, f"activations/{name}"), name


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


# =========================================================================== report
def test_report_without_findings(seed_cnn, writer):
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 3)
    assert w.alerts == []
    assert "no problems found in 3 steps" in w.report()


# =========================================================================== SIGTERM
SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from introspect import watch
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, sys.argv[1], every=1, summary=False, graph=False) as w:
        for i in range(4):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        print("ready", flush=True)  # steps 0-3 are complete
        time.sleep(60)  # SIGTERM arrives here
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_leaves_completed_steps_on_disk(tmp_path):
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(logdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # it did stop, and promptly
    steps = hist_steps(read_events(logdir), "activations/0")
    assert steps == [0, 1, 2, 3], steps


# =========================================================================== CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model(tmp_path):
    torch.manual_seed(0)
    model = SeedCNN().cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, tmp_path / "run", every=1, **QUIET) as w:
        for _ in range(2):
            x, y = seed_cnn_batch()
            loss = seed_cnn_loss(model(x.cuda()), y.cuda())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.step == 1 and w.alerts == []
    acc = read_events(tmp_path / "run")
    for m, shape in SEED_CNN_OUTPUT_SHAPES.items():
        assert hist_steps(acc, f"activations/{m}") == [0, 1]
        assert hist_at(acc, f"activations/{m}", 0).num == numel(shape)
    for p in SEED_CNN_PARAM_SHAPES:
        h = hist_at(acc, f"weights/{p}", 0)
        assert (h.min, h.max) == (before[p].min().item(), before[p].max().item())
        assert hist_steps(acc, f"grads/{p}") == [0, 1]


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


class EmptyBranch(nn.Module):
    """Returns its input and an empty slice of it (a zero-width feature group)."""

    def forward(self, x: torch.Tensor):
        return x, x[:, :0]


def test_empty_outputs_are_skipped_quietly(writer, logdir):
    model = nn.Sequential(nn.Linear(4, 8), EmptyBranch())
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)  # no probe may fail on it
        with watch(model, writer, every=1, **QUIET) as w:
            out, empty = model(torch.randn(3, 4))
            (out.sum() + empty.sum()).backward()
    assert w.alerts == []
    hists = histogram_tags(read_events(logdir))
    assert "activations/1/0" in hists and "activations/1/1" not in hists


def test_update_ratio_of_a_weight_that_was_exactly_zero_is_not_written(writer, logdir):
    # A zero-initialised bias has no size to compare its update with: nothing at that step (not
    # 1e10), and the ratio from the first step where it is not zero.
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with watch(model, writer, every=1, optimizer=opt, **QUIET):
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    acc = read_events(logdir)
    assert [e.step for e in acc.Scalars("update_ratio/weight")] == [0, 1, 2]
    ratios = acc.Scalars("update_ratio/bias")
    assert [e.step for e in ratios] == [1, 2]
    assert all(0 < e.value < 10 for e in ratios)

"""watch(): the tags it writes and the steps it writes them at (the step clock, eval and no_grad
passes, optimizer= cadence with gradient accumulation), checked against the real tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import (
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
)
from tests.support.training import train
from tests.support.zoo import SEED_CNN_MODULES, SeedCNN, seed_cnn_batch, seed_cnn_loss

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
    seen, outputs, module_hooks = [], [], []
    with watch(seed_cnn, writer, every=2, check_every=0, **QUIET):
        # The output is looked at after the step (watch's own hook on conv1 exists on logging
        # steps only, added when the step opens: after this one).
        def spy(module, args, out):
            param_hooks = any(getattr(p, "_post_accumulate_grad_hooks", None) for p in seed_cnn.parameters())
            seen.append(param_hooks)
            outputs.append(out)
            module_hooks.append(len(module._forward_hooks))

        handle = seed_cnn.conv1.register_forward_hook(spy)
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 5)
        handle.remove()
    assert [(bool(out._backward_hooks), p) for out, p in zip(outputs, seen)] == [
        (True, True),
        (False, False),
        (True, True),
        (False, False),
        (True, True),
    ]
    assert module_hooks[1] == module_hooks[3] == 1  # off the cadence: the spy alone, no hook of watch
    assert min(module_hooks[0::2]) > 1
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

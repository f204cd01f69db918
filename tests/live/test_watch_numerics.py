"""watch() never changes training (bitwise-identical losses and state), and what it writes for the
model zoo, shared modules, LSTMs, odd and empty outputs, and update ratios."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import (
    IntrospectWarning,
    watch,
)
from tests.support import QUIET
from tests.support.events import (
    hist_at,
    hist_steps,
    histogram_tags,
    read_events,
    scalar_tags,
    tags_with_prefix,
)
from tests.support.hooks import hook_state
from tests.support.training import assert_same_losses, assert_same_state, make_optimizer, train
from tests.support.zoo import ZOO, ZooCase


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
        # max_modules=None: every module's tags, whatever the model's size (the budget has its own tests)
        with watch(model, tmp_path / "run", every=1, max_modules=None, **QUIET) as w:
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

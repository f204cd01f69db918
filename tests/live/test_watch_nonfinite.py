"""watch() and NaN/Inf: counted, histogrammed without them, located, warned once per origin, raised
before the weights change (on_nonfinite=), sampled by check_every, and found in backward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from introspect import (
    NonFiniteError,
    NonFiniteWarning,
    watch,
)
from tests.support import QUIET
from tests.support.events import (
    hist_at,
    hist_steps,
    read_events,
    scalar_at,
    scalar_tags,
    text_of,
)
from tests.support.hooks import hook_state


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


class _LandedEvent:
    """A CUDA event whose copy has always landed, for the deferred read's logic on a CPU."""

    def record(self) -> None: ...

    def query(self) -> bool:
        return True

    def synchronize(self) -> None: ...


def test_a_deferred_read_after_the_optimizer_step_still_reports(tmp_path, monkeypatch):
    """The CUDA path of the sentinel (norms copied without blocking, the verdict read later),
    driven on the CPU: a NaN whose verdict comes after optimizer.step() moved the weights and
    zero_grad emptied .grad is still a finding, naming the parameters the read saw."""
    from introspect.probes.nonfinite import sentinel

    monkeypatch.setattr(sentinel.DeferredReads, "possible", lambda self, grads, *rest: bool(grads))
    monkeypatch.setattr(sentinel.torch.cuda, "Event", _LandedEvent)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, tmp_path / "run", every=50, **QUIET) as w:
            for step in range(4):
                loss = model(torch.randn(3, 4)).square().mean()
                if step == 2:
                    loss = loss * float("nan")
                opt.zero_grad()
                loss.backward()
                opt.step()
    found = [a for a in w.alerts if a.kind == "nonfinite"]
    assert found and found[0].step == 2
    assert "without blocking" in found[0].message

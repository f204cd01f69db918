"""The debugger: non-finite origin (unit and end to end), dead/saturated units, gradient health,
the report, and no false alarms on healthy training.

The end-to-end tests assert the exact module name and step of each finding: a debugger that says
"something is NaN somewhere around step 3" is no debugger. Basic NaN cases (a poisoned activation,
warn/raise/ignore, check_every) live in tests/live/test_watch_nonfinite.py; these go deeper.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import Alert, ConfigError, NonFiniteError, NonFiniteWarning, watch
from introspect.debugger.alerts import alerts_markdown, format_report
from introspect.debugger.health import (
    GradientHealth,
    Thresholds,
    check_activation_health,
)
from introspect.debugger.origins import CallRecord, locate_nonfinite
from introspect.records.step import Check
from tests.support import QUIET
from tests.support.events import hist_steps, read_events, text_of
from tests.support.hooks import count_hooks, hook_state
from tests.support.zoo import SeedCNN

NAN = float("nan")
INF = float("inf")


def kinds_at(alerts: list[Alert], kind: str) -> list[str]:
    return [a.where for a in alerts if a.kind == kind]


def nonfinite(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.kind == "nonfinite"]


# =========================================================================== locate_nonfinite (unit)
def chain(*names: str, safe: tuple[str, ...] = ()) -> list[CallRecord]:
    """Calls of a plain chain: each reads the previous one's output (the first reads the input)."""
    return [
        CallRecord(name, "Safe" if name in safe else "Linear", producers=[i - 1] if i else [], safe=name in safe)
        for i, name in enumerate(names)
    ]


def test_locate_all_finite_is_none():
    calls = chain("a", "b")
    labels = [
        Check("model_in"),
        Check("in", 0),
        Check("out", 0, "a"),
        Check("out", 1, "b"),
        Check("grad", 1, "b"),
        Check("grad", 0, "a"),
    ]
    assert locate_nonfinite(0, calls, labels, [1.0, 1.0, 2.0, -3.0, 0.5, 0.0]) is None
    assert locate_nonfinite(0, [], [], []) is None


def test_locate_forward_origin_not_the_modules_downstream():
    calls = chain("a", "b", "c", "d")
    labels = [Check("in", 0), Check("out", 0, "a"), Check("out", 1, "b"), Check("out", 2, "c"), Check("out", 3, "d")]
    alert = locate_nonfinite(7, calls, labels, [1.0, 1.0, NAN, NAN, NAN])
    assert alert.kind == "nonfinite"
    assert alert.where == "b"
    assert alert.step == 7
    assert alert.phase == "forward"
    assert alert.module_type == "Linear"
    assert alert.numbers["later_nonfinite_modules"] == 2
    assert alert.message.startswith("NaN first appears in the output of b")


def test_locate_inf_is_called_inf():
    calls = chain("a", "b")
    alert = locate_nonfinite(0, calls, [Check("out", 0, "a"), Check("out", 1, "b")], [INF, -INF])
    assert alert.where == "a"
    assert alert.message.startswith("Inf first appears")
    assert alert.numbers["later_nonfinite_modules"] == 1


def test_locate_container_and_child_gives_the_deepest():
    """Forward hooks fire child first, container after: both outputs are NaN, both read finite
    inputs; the child is the origin."""
    calls = [
        CallRecord("stem", "Linear"),
        CallRecord("block.log", "ShiftedLog", producers=[0]),
        CallRecord("block.lin", "Linear", producers=[1]),
        CallRecord("block", "Block", producers=[0]),
        CallRecord("head", "Linear", producers=[3]),
    ]
    labels = [
        Check("in", 0),
        Check("out", 0, "stem"),
        Check("out", 1, "block.log"),
        Check("out", 2, "block.lin"),
        Check("out", 3, "block"),
        Check("out", 4, "head"),
    ]
    alert = locate_nonfinite(3, calls, labels, [0.0, 1.0, NAN, NAN, NAN, NAN])
    assert (alert.where, alert.step, alert.phase, alert.module_type) == ("block.log", 3, "forward", "ShiftedLog")
    assert alert.numbers["later_nonfinite_modules"] == 3


def test_locate_container_whose_own_code_made_it():
    """The children are finite, the container's own code (after them) is not: the container."""
    calls = [
        CallRecord("block.lin", "Linear"),
        CallRecord("block", "Block"),
        CallRecord("head", "Linear", producers=[1]),
    ]
    labels = [
        Check("in", 0),
        Check("out", 0, "block.lin"),
        Check("in", 1),
        Check("out", 1, "block"),
        Check("out", 2, "head"),
    ]
    alert = locate_nonfinite(0, calls, labels, [1.0, 1.0, 1.0, NAN, NAN])
    assert alert.where == "block"


def test_locate_nan_made_between_modules_by_unwatched_code():
    """``b`` reads a tensor no watched call produced (``torch.log(a_out - 5)`` in the parent's
    forward): it is named, with the news that the NaN reached it through its input."""
    calls = [CallRecord("a", "Linear"), CallRecord("b", "Linear"), CallRecord("c", "Linear", producers=[1])]
    labels = [Check("in", 0), Check("out", 0, "a"), Check("in", 1), Check("out", 1, "b"), Check("out", 2, "c")]
    alert = locate_nonfinite(4, calls, labels, [1.0, 2.0, NAN, NAN, NAN])
    assert alert.where == "b"
    assert alert.step == 4
    assert alert.phase == "forward"
    assert "through its input" in alert.message
    assert "no watched module covers" in alert.message
    assert "between a and b" in alert.message


def test_locate_unwatched_code_before_the_first_module():
    calls = [CallRecord("a", "Linear"), CallRecord("b", "Linear", producers=[0])]
    labels = [Check("model_in"), Check("in", 0), Check("out", 0, "a"), Check("out", 1, "b")]
    alert = locate_nonfinite(0, calls, labels, [1.0, NAN, NAN, NAN])
    assert alert.where == "a"
    assert "before a" in alert.message


def test_locate_model_input():
    calls = chain("a", "b")
    labels = [Check("model_in"), Check("out", 0, "a"), Check("out", 1, "b")]
    alert = locate_nonfinite(2, calls, labels, [NAN, NAN, NAN])
    assert (alert.where, alert.step, alert.phase) == ("input", 2, "forward")
    assert "data" in alert.message


def test_locate_safe_modules_pass_nonfinite_through():
    """Finite-preserving calls (ReLU, pooling) are not summed: their output is as finite as their
    input, so the origin is the module before them."""
    calls = chain("lin1", "relu", "lin2", safe=("relu",))
    labels = [Check("in", 0), Check("out", 0, "lin1"), Check("out", 2, "lin2")]
    alert = locate_nonfinite(0, calls, labels, [1.0, NAN, NAN])
    assert alert.where == "lin1"
    assert alert.numbers["later_nonfinite_modules"] == 1  # lin2; the safe relu is not counted


def test_locate_backward_origin():
    """Forward finite; gradients in the order backward made them: lin2's and sqrt's outputs got a
    finite gradient, lin1's output a NaN one, so sqrt's backward made it."""
    calls = chain("lin1", "sqrt", "lin2")
    labels = [
        Check("in", 0),
        Check("out", 0, "lin1"),
        Check("out", 1, "sqrt"),
        Check("out", 2, "lin2"),
        Check("grad", 2, "lin2"),
        Check("grad", 1, "sqrt"),
        Check("grad", 0, "lin1"),
    ]
    alert = locate_nonfinite(5, calls, labels, [1.0, 1.0, 1.0, 1.0, 0.5, 0.3, NAN])
    assert (alert.where, alert.step, alert.phase, alert.module_type) == ("sqrt", 5, "backward", "Linear")
    assert "backward of sqrt" in alert.message
    assert "lin1" in alert.message


def test_locate_backward_origin_skips_safe_readers():
    calls = [
        CallRecord("lin1", "Linear"),
        CallRecord("relu", "ReLU", producers=[0], safe=True),
        CallRecord("norm", "Norm", producers=[0]),
        CallRecord("lin2", "Linear", producers=[1, 2]),
    ]
    labels = [
        Check("out", 0, "lin1"),
        Check("out", 2, "norm"),
        Check("out", 3, "lin2"),
        Check("grad", 3, "lin2"),
        Check("grad", 2, "norm"),
        Check("grad", 0, "lin1"),
    ]
    alert = locate_nonfinite(1, calls, labels, [1.0, 1.0, 1.0, 1.0, 1.0, INF])
    assert (alert.where, alert.phase) == ("norm", "backward")
    assert "Inf gradient" in alert.message


def test_locate_loss_gradient_nonfinite_names_the_last_module():
    calls = chain("lin1", "act", "lin2", safe=("act",))
    labels = [
        Check("in", 0),
        Check("out", 0, "lin1"),
        Check("out", 2, "lin2"),
        Check("grad", 2, "lin2"),
        Check("grad", 0, "lin1"),
    ]
    alert = locate_nonfinite(3, calls, labels, [1.0, 1.0, 1.0, NAN, NAN])
    assert (alert.where, alert.step, alert.phase) == ("lin2", 3, "backward")
    assert "loss" in alert.message


def test_locate_backward_made_by_unwatched_code():
    """The only reader of lin1's output got a NaN gradient itself: the code between them did it."""
    calls = [CallRecord("lin1", "Linear"), CallRecord("relu", "ReLU", producers=[0], safe=True)]
    alert = locate_nonfinite(0, calls, [Check("out", 0, "lin1"), Check("grad", 0, "lin1")], [1.0, NAN])
    assert alert.where == "lin1"
    assert "no watched module covers" in alert.message


def test_locate_forward_wins_over_backward():
    calls = chain("a", "b")
    labels = [Check("out", 0, "a"), Check("out", 1, "b"), Check("grad", 1, "b"), Check("grad", 0, "a")]
    alert = locate_nonfinite(0, calls, labels, [1.0, NAN, NAN, NAN])
    assert (alert.where, alert.phase) == ("b", "forward")


# =========================================================================== health checks (unit)
def test_activation_health_dead_and_saturated():
    types = {"relu": "ReLU", "sig": "Sigmoid", "lstm": "LSTM", "ok": "ReLU"}
    measures = {"dead/relu": 0.75, "saturated/sig": 0.5, "dead/ok": 0.49, "saturated/lstm/0": 0.9}
    alerts = check_activation_health(4, measures, types, Thresholds())
    by_where = {a.where: a for a in alerts}
    assert set(by_where) == {"relu", "sig", "lstm/0"}
    assert by_where["relu"].kind == "dead_units"
    assert by_where["relu"].numbers == {"dead_fraction": 0.75}
    assert by_where["relu"].module_type == "ReLU"
    assert by_where["relu"].step == 4
    assert "75%" in by_where["relu"].message
    assert by_where["sig"].kind == "saturated_units"
    assert by_where["sig"].numbers == {"saturated_fraction": 0.5}
    assert by_where["lstm/0"].module_type == "LSTM"  # an output suffix finds its module


def test_activation_health_thresholds():
    measures = {"dead/relu": 0.75, "saturated/sig": 0.95}
    types = {"relu": "ReLU", "sig": "Sigmoid"}
    strict = Thresholds(dead_fraction=0.9, saturated_fraction=0.99)
    assert check_activation_health(0, measures, types, strict) == []
    assert check_activation_health(0, {}, types, Thresholds()) == []


def test_gradient_health_vanishing():
    health = GradientHealth(Thresholds())
    layers = {
        "0": (1e-16 * 100, 100),  # RMS 1e-8
        "1": (1e-4 * 100, 100),  # RMS 1e-2
        "2": (1e-4 * 100, 100),
        "3": (4e-4 * 100, 100),  # RMS 2e-2
    }
    alerts = health.check(0, layers, {})
    assert [(a.kind, a.where) for a in alerts] == [("vanishing_gradient", "0")]
    assert alerts[0].numbers["rms"] == pytest.approx(1e-8)
    assert alerts[0].numbers["median_rms"] == pytest.approx(1e-2)


def test_gradient_health_vanishing_floor_and_empty_layers():
    health = GradientHealth(Thresholds())
    # One layer only: no median to compare with, but below the floor.
    assert [a.where for a in health.check(0, {"only": (0.0, 10)}, {})] == ["only"]
    health = GradientHealth(Thresholds())
    assert health.check(0, {"only": (1.0, 10)}, {}) == []
    # No values and non-finite sums are skipped, not reported.
    assert health.check(0, {"empty": (0.0, 0), "nan": (NAN, 5), "ok": (1.0, 4)}, {}) == []


def test_gradient_health_exploding_norm_and_jump():
    health = GradientHealth(Thresholds())
    # The jump rule needs a reference: the median of at least 3 earlier logging steps.
    for step in (0, 1, 2):
        assert health.check(step, {"a": (1.0, 4), "b": (1.0, 4)}, {}) == []
    # a: norm 1 -> 200 (x200 jump); b: norm 1 -> 50 (below the x100 jump)
    alerts = health.check(10, {"a": (200.0**2, 4), "b": (50.0**2, 4)}, {})
    assert [(a.kind, a.where, a.step) for a in alerts] == [("exploding_gradient", "a", 10)]
    assert alerts[0].numbers == {"norm": pytest.approx(200.0), "reference_norm": pytest.approx(1.0)}
    # Absolute: above 1e6, whatever came before.
    alerts = health.check(20, {"a": (1e14, 4), "b": (1e14, 4)}, {})
    assert {(a.kind, a.where) for a in alerts} == {("exploding_gradient", "a"), ("exploding_gradient", "b")}
    assert all(a.numbers["norm"] == pytest.approx(1e7) for a in alerts)


def test_gradient_health_jump_from_zero_is_not_exploding():
    health = GradientHealth(Thresholds())
    health.check(0, {"a": (0.0, 4), "b": (1.0, 4)}, {})
    alerts = health.check(1, {"a": (1.0, 4), "b": (1.0, 4)}, {})
    assert [a.kind for a in alerts] == []


def test_gradient_health_stuck():
    health = GradientHealth(Thresholds())
    alerts = health.check(3, {}, {"0.weight": 0.0, "0.bias": 1e-11, "2.weight": 1e-3, "2.bias": NAN})
    assert [(a.kind, a.where, a.step) for a in alerts] == [
        ("stuck_parameter", "0.weight", 3),
        ("stuck_parameter", "0.bias", 3),
    ]
    assert alerts[1].numbers == {"update_ratio": 1e-11}


def test_gradient_health_custom_thresholds():
    health = GradientHealth(Thresholds(exploding_norm=10.0, vanishing_ratio=0.01, stuck_ratio=0.1))
    alerts = health.check(0, {"a": (400.0, 1), "b": (1.0, 1), "c": (1.0, 1)}, {"a.w": 0.05})
    assert {(a.kind, a.where) for a in alerts} == {
        ("exploding_gradient", "a"),  # norm 20 > 10
        ("stuck_parameter", "a.w"),
    }


# =========================================================================== Thresholds
def test_thresholds_coerce():
    default = Thresholds.coerce(None)
    assert default == Thresholds()
    assert default.dead_fraction == 0.5
    custom = Thresholds(dead_fraction=0.9)
    assert Thresholds.coerce(custom) == custom  # checked too (a hand-built one may hold NaN)
    coerced = Thresholds.coerce({"dead_fraction": 1, "exploding_norm": 1e3})
    assert coerced.dead_fraction == 1.0
    assert isinstance(coerced.dead_fraction, float)
    assert coerced.exploding_norm == 1e3
    assert coerced.vanishing_ratio == Thresholds().vanishing_ratio


def test_thresholds_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="dead_fractoin"):
        Thresholds.coerce({"dead_fractoin": 0.9})
    with pytest.raises(ConfigError):
        Thresholds.coerce([("dead_fraction", 0.9)])
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        Thresholds.coerce("strict")


def test_watch_rejects_unknown_thresholds_before_hooking(seed_cnn, tmp_path):
    before = count_hooks(hook_state(seed_cnn))
    with pytest.raises(ConfigError, match="bogus"):
        watch(seed_cnn, str(tmp_path), thresholds={"bogus": 1.0}, **QUIET)
    assert count_hooks(hook_state(seed_cnn)) == before
    with watch(seed_cnn, str(tmp_path), thresholds={"dead_fraction": 0.9}, **QUIET) as w:
        assert w.thresholds.dead_fraction == 0.9


# =========================================================================== format_report
def test_format_report_clean():
    assert format_report([], 12) == "introspect: no problems found in 12 steps."
    assert format_report([], 1) == "introspect: no problems found in 1 step."


def test_format_report_table():
    alerts = [
        Alert("nonfinite", "blocks.4.log", 3, "NaN first appears here", phase="forward"),
        Alert("dead_units", "relu", 10, "100% dead", {"dead_fraction": 1.0}),
    ]
    text = format_report(alerts, 20)
    lines = text.splitlines()
    assert lines[0] == "introspect: 2 findings in 20 steps"
    assert lines[1].split() == ["step", "finding", "where", "details"]
    assert lines[2].split()[:5] == ["3", "nonfinite", "(forward)", "blocks.4.log", "NaN"]
    assert lines[2].endswith("NaN first appears here")
    assert lines[3].split()[0] == "try:"  # what to try, under the details column
    assert lines[3].index("try:") == lines[1].index("details")
    assert lines[4].split()[:3] == ["10", "dead_units", "relu"]
    # Columns line up.
    assert lines[1].index("where") == lines[2].index("blocks.4.log") == lines[4].index("relu")
    assert format_report(alerts[:1], 1).splitlines()[0] == "introspect: 1 finding in 1 step"


def test_alerts_markdown():
    text = alerts_markdown([Alert("stuck_parameter", "a.b", 3, "not learning")])
    assert text.splitlines()[2] == (
        "| 3 | stuck_parameter | `a.b` | not learning **Try:** put it in the optimizer's param groups, "
        "with a learning rate above 0. |"
    )
    text = alerts_markdown([Alert("nonfinite", "a.b", 3, "NaN here", phase="backward")])
    assert text.splitlines()[2].startswith("| 3 | nonfinite (backward) | `a.b` | NaN here **Try:** ")


def test_alert_str():
    assert str(Alert("dead_units", "relu", 4, "all dead")) == "step 4: dead_units at relu: all dead"


# =========================================================================== non-finite, end to end
class ShiftedLog(nn.Module):
    """``log(x + shift)``: finite for tanh outputs while ``shift > 1``; the test sets it negative."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x + self.shift)


class LogBlock(nn.Module):
    """A container with a parameter of its own (so it is watched too) around the log."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(16))
        self.log = ShiftedLog()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(self.log(x)) * self.gain)


def deep_tanh_net(middle: nn.Module) -> nn.Sequential:
    """8 blocks of Linear+Tanh with ``middle`` after the 4th, then a head."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(4):
        layers[f"block{i}"] = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    layers["mid"] = middle
    for i in range(4, 8):
        layers[f"block{i}"] = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    layers["head"] = nn.Linear(16, 1)
    return nn.Sequential(layers)


def train_skipping_nonfinite(model, steps, make_batch, before_step=None, opt=None) -> list[float]:
    """Train; skip the update when a gradient is not finite (so the weights stay finite)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, y = make_batch(step)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
    return losses


def vector_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 16), torch.randn(8, 1)


@pytest.mark.parametrize(
    "nested, origin, later",
    [(False, "mid", 5), (True, "mid.log", 7)],
    ids=["module", "child-of-watched-container"],
)
def test_nan_born_deep_in_the_forward_is_located(logdir, nested, origin, later):
    torch.manual_seed(0)
    model = deep_tanh_net(LogBlock() if nested else ShiftedLog())
    log = model.mid.log if nested else model.mid

    def before_step(step):
        log.shift = -2.0 if step == 3 else 2.0  # log of a negative number at step 3 only

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, str(logdir), every=100, **QUIET) as w:
            losses = train_skipping_nonfinite(model, 6, vector_batch, before_step)
    assert [math.isfinite(v) for v in losses] == [True, True, True, False, True, True]
    assert len(w.alerts) == 1, w.alerts
    alert = w.alerts[0]
    assert (alert.kind, alert.where, alert.step, alert.phase) == ("nonfinite", origin, 3, "forward")
    assert alert.module_type == "ShiftedLog"
    # Every later Linear (and the container) went NaN too; the alert says so, and names none of them.
    assert alert.numbers["later_nonfinite_modules"] == later
    assert "NaN first appears in the output of " + origin in alert.message
    warned = [r for r in record if issubclass(r.category, NonFiniteWarning)]
    assert len(warned) == 1 and origin in str(warned[0].message)
    report = w.report()
    assert origin in report and "nonfinite (forward)" in report and "6 steps" in report
    acc = read_events(logdir)
    # After a finding the next steps (an escalation: escalate_steps=3, the run ends at step 5) are
    # logged whatever the cadence (every=100 would log step 0 only).
    assert hist_steps(acc, "activations/block0.0") == [0, 4, 5]
    texts = text_of(acc, "diagnostics/alerts")
    assert texts and f"`{origin}`" in texts[-1]


class Detour(nn.Module):
    """NaN made by a functional call between two watched children."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 1)
        self.poisoned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.poisoned:
            h = torch.log(h - 100.0)
        return self.c(torch.relu(self.b(h)))


def test_nan_made_between_watched_modules_names_the_next_and_says_so(writer):
    torch.manual_seed(0)
    model = Detour()

    def before_step(step):
        model.poisoned = step == 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=1, **QUIET) as w:
            train_skipping_nonfinite(model, 3, lambda s: (torch.randn(4, 4), torch.randn(4, 1)), before_step)
    [alert] = w.alerts
    assert (alert.where, alert.step, alert.phase) == ("b", 1, "forward")
    assert "between a and b" in alert.message


class WithNorm(nn.Module):
    """Appends each row's L2 norm. At a zero row the forward is finite (sqrt(0) = 0) but the
    backward is not: d sqrt/dx at 0 is inf, times the zero from pow's backward is NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.sqrt(x.pow(2).sum(-1, keepdim=True))], -1)


class SignedSqrt(nn.Module):
    """``sign(x) * sqrt(|x|)`` (bilinear-pooling style): 0 at 0, but the slope there is infinite
    and the backward gives 0 * inf = NaN. (``x.clamp(min=0).sqrt()`` would not do: clamp's backward
    drops the gradient at the boundary.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()


def norm_net(middle: nn.Module, width: int = 9) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            lin1=nn.Linear(4, 8, bias=False),  # a zero input row gives a zero output row exactly
            norm=middle,
            act=nn.Tanh(),
            lin2=nn.Linear(width, 1),
        )
    )


def padded_batch(step: int, zero_at: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """6 samples; at step ``zero_at`` one of them is all-zero padding."""
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    if step == zero_at:
        x[3] = 0.0
    return x, y


@pytest.mark.parametrize(
    "middle, width", [(WithNorm, 9), (SignedSqrt, 8)], ids=["sqrt-of-sum-of-squares", "signed-sqrt"]
)
def test_nan_born_in_the_backward_is_located(logdir, middle, width):
    torch.manual_seed(0)
    model = norm_net(middle(), width)
    outputs_finite = []
    model.register_forward_hook(lambda m, a, out: outputs_finite.append(bool(torch.isfinite(out).all())))
    grads_finite = []

    def batch(step):
        if step > 0:
            grads_finite.append(bool(torch.isfinite(model.lin1.weight.grad).all()))
        return padded_batch(step)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, str(logdir), every=100, **QUIET) as w:
            train_skipping_nonfinite(model, 5, batch)
    assert all(outputs_finite)  # the forward never saw a NaN
    assert grads_finite == [True, True, False, True]  # steps 0..3: step 2's backward made it
    assert len(w.alerts) == 1, w.alerts
    alert = w.alerts[0]
    assert (alert.kind, alert.where, alert.step, alert.phase) == ("nonfinite", "norm", 2, "backward")
    assert alert.module_type == middle.__name__
    assert "backward of norm" in alert.message
    assert len([r for r in record if issubclass(r.category, NonFiniteWarning)]) == 1
    assert "nonfinite (backward)" in w.report()
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/lin1") == [0, 3, 4]  # the escalation after the NaN (the run ends at 4)
    texts = text_of(acc, "diagnostics/alerts")
    assert texts and "`norm`" in texts[-1] and "backward" in texts[-1]


def test_nan_in_backward_warns_once_across_steps(writer):
    torch.manual_seed(0)
    model = norm_net(WithNorm())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, writer, every=1, **QUIET) as w:
            train_skipping_nonfinite(model, 6, lambda s: padded_batch(s, zero_at=s if s >= 2 else -1))
    warned = [r for r in record if issubclass(r.category, NonFiniteWarning)]
    assert len(warned) == 1
    assert "step 2" in str(warned[0].message) and "norm" in str(warned[0].message)
    assert [(a.where, a.step, a.phase) for a in w.alerts] == [("norm", 2, "backward")]


def test_nan_in_backward_raises_inside_backward_before_the_weights_change(writer):
    torch.manual_seed(0)
    model = norm_net(WithNorm())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    phases = []
    weights = {}
    with pytest.raises(NonFiniteError) as info:
        with watch(model, writer, every=1, optimizer=opt, on_nonfinite="raise", **QUIET) as w:
            for step in range(5):
                x, y = padded_batch(step)
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                phases.append((step, "backward"))
                loss.backward()
                phases.append((step, "step"))
                opt.step()
    assert phases[-1] == (2, "backward")
    alert = info.value.alert
    assert (alert.where, alert.step, alert.phase) == ("norm", 2, "backward")
    assert "norm" in str(info.value)
    assert w.step == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key  # bitwise: optimizer.step() never ran
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_gradient_names_the_last_module(writer):
    """The model is fine; ``sqrt`` in the loss has an infinite slope at 0: blame lands on the
    model's last module, with words saying it came from after the model."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(lin1=nn.Linear(4, 8), act=nn.ReLU(), lin2=nn.Linear(8, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=1, **QUIET) as w:
            for step in range(3):
                out = model(torch.randn(16, 4))
                loss = (out - out.detach()).sqrt().sum() if step == 1 else out.pow(2).mean()
                loss.backward()
    [alert] = nonfinite(w.alerts)
    assert (alert.where, alert.step, alert.phase) == ("lin2", 1, "backward")
    assert "loss" in alert.message


def test_nan_in_the_input_batch(writer, logdir):
    torch.manual_seed(0)
    model = deep_tanh_net(ShiftedLog())

    def batch(step):
        x, y = vector_batch(step)
        if step == 2:
            x[5, 7] = float("nan")
        return x, y

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, writer, every=1, **QUIET) as w:
            train_skipping_nonfinite(model, 4, batch)
    [alert] = w.alerts
    assert (alert.kind, alert.where, alert.step, alert.phase) == ("nonfinite", "input", 2, "forward")
    assert "data" in alert.message
    assert len([r for r in record if issubclass(r.category, NonFiniteWarning)]) == 1
    assert "input" in w.report()
    acc = read_events(logdir)
    texts = text_of(acc, "diagnostics/alerts")
    assert texts and "`input`" in texts[-1]


def test_nan_in_the_input_batch_raises(writer):
    torch.manual_seed(0)
    model = deep_tanh_net(ShiftedLog())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteError) as info:
        with watch(model, writer, every=10, optimizer=opt, on_nonfinite="raise", **QUIET):
            for step in range(4):
                x, y = vector_batch(step)
                if step == 1:
                    x[0, 0] = float("inf")
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                weights = [p.detach().clone() for p in model.parameters()]
                loss.backward()
                opt.step()
    assert (info.value.alert.where, info.value.alert.step) == ("input", 1)
    assert step == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))


# =========================================================================== no false alarms
def seed_cnn_learnable_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose channel-0 brightness is shifted by the target: easy to learn."""
    target = torch.randn(n)
    x = torch.randn(n, 3, 32, 32)
    x[:, 0] += target[:, None, None]
    return x, target.unsqueeze(1)


@pytest.mark.slow
def test_no_false_alarm_seed_cnn(writer):
    torch.manual_seed(0)
    model = SeedCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with watch(model, writer, every=10, **QUIET) as w:
        for _ in range(200):
            x, y = seed_cnn_learnable_batch()
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20  # it learned: healthy training
    assert w.alerts == []
    assert w.report() == "introspect: no problems found in 200 steps."


def ring_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives on a ring of radius 5 +- 1, negatives at 8 +- 1."""
    label = (torch.rand(n) < 0.5).float()
    radius = torch.where(label > 0, 5.0, 8.0) + (torch.rand(n) * 2 - 1)
    angle = torch.rand(n) * (2 * math.pi)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1), label.unsqueeze(1)


def test_no_false_alarm_ring_mlp(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    with watch(model, writer, every=10, **QUIET) as w:
        for _ in range(200):
            x, y = ring_batch()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.alerts == []
    assert "no problems found in 200 steps" in w.report()


# =========================================================================== health, end to end
def regression_batch(features: int, n: int = 16):
    return lambda: (torch.randn(n, features), torch.randn(n, 1))


def run(model, logdir_or_writer, make_batch, steps, opt=None, **options) -> list[Alert]:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, logdir_or_writer, **QUIET, **options) as w:
        for _ in range(steps):
            x, y = make_batch()
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.alerts


def test_dead_relus_from_a_large_negative_bias(writer):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(8, 32), relu=nn.ReLU(), out=nn.Linear(32, 1)))
    with torch.no_grad():
        model.hidden.bias.fill_(-100.0)
    alerts = run(model, writer, regression_batch(8), 3, every=1, thresholds={"dead_min_samples": 8})
    dead = [a for a in alerts if a.kind == "dead_units"]
    assert [(a.where, a.step, a.module_type) for a in dead] == [("relu", 0, "ReLU")]
    assert dead[0].numbers["dead_fraction"] >= 0.99
    assert "100%" in dead[0].message


def test_dead_units_threshold_is_configurable(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-100.0, -100.0, -100.0, 100.0]))  # 3 of 4 dead
    alerts = run(
        model, writer, regression_batch(8), 1, every=1, thresholds={"dead_fraction": 0.9, "dead_min_samples": 8}
    )
    assert kinds_at(alerts, "dead_units") == []
    alerts = run(
        model, writer, regression_batch(8), 1, every=1, thresholds=Thresholds(dead_fraction=0.75, dead_min_samples=8)
    )
    assert [(a.where, a.numbers["dead_fraction"]) for a in alerts if a.kind == "dead_units"] == [("1", 0.75)]


def test_dead_conv_channels(writer):
    """Units of a conv map are its channels (dim 1): a channel is dead when it is zero at every
    position of every sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 1))
    with torch.no_grad():
        model[0].bias[:6] = -100.0
    alerts = run(
        model,
        writer,
        lambda: (torch.randn(4, 3, 8, 8), torch.randn(4, 1)),
        1,
        every=1,
        thresholds={"dead_min_samples": 4},
    )
    dead = [a for a in alerts if a.kind == "dead_units"]
    assert [(a.where, a.numbers["dead_fraction"]) for a in dead] == [("1", 0.75)]


def test_dead_units_are_judged_over_enough_samples(writer):
    """One small batch says little: units are dead only when zero for every sample of a window of
    logging steps holding ``dead_min_samples`` (64) samples: here steps 0-3 at batch 16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    alerts = run(model, writer, regression_batch(8), 3, every=1)
    assert kinds_at(alerts, "dead_units") == []
    alerts = run(model, writer, regression_batch(8), 4, every=1)
    assert [(a.where, a.step) for a in alerts if a.kind == "dead_units"] == [("1", 3)]


def test_a_rarely_active_unit_is_not_dead(writer):
    """A unit active on a few inputs in a hundred looks dead in one batch of 8, not over 64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-2.0)  # active only for x > 2: ~2% of standard normal inputs

    def batch():
        return torch.randn(8, 1), torch.randn(8, 1)

    torch.manual_seed(3)
    alerts = run(model, writer, batch, 24, every=1, thresholds={"dead_min_samples": 192})
    assert kinds_at(alerts, "dead_units") == []


def deep_sigmoid_mlp(depth: int = 12) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


def test_vanishing_gradients_in_a_deep_sigmoid_mlp(writer):
    torch.manual_seed(0)
    model = deep_sigmoid_mlp()
    alerts = run(model, writer, regression_batch(32), 2, every=1)
    vanishing = [a for a in alerts if a.kind == "vanishing_gradient"]
    assert vanishing, alerts
    where = [a.where for a in vanishing]
    assert "0" in where  # the first Linear
    # Only the first layers: the Linears are 0, 2, 4, ..., 22 and the head 24.
    assert all(int(w) <= 8 for w in where), where
    assert all(a.step == 0 for a in vanishing)
    first = next(a for a in vanishing if a.where == "0")
    assert first.numbers["rms"] < 1e-4 * first.numbers["median_rms"]
    assert not kinds_at(alerts, "exploding_gradient")


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class GradAmplifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ScaleGrad.apply(x, self.scale)


def test_exploding_gradient_jump(writer):
    """Gradients of the layers before the amplifier grow x1e4 at step 3: exactly those layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            lin1=nn.Linear(8, 16),
            act1=nn.Tanh(),
            lin2=nn.Linear(16, 16),
            amp=GradAmplifier(),
            act2=nn.Tanh(),
            lin3=nn.Linear(16, 1),
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: only the gradient jumps
    with watch(model, writer, every=1, **QUIET) as w:
        for step in range(5):
            model.amp.scale = 1e4 if step == 3 else 1.0
            x, y = regression_batch(8)()
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    exploding = [a for a in w.alerts if a.kind == "exploding_gradient"]
    assert sorted((a.where, a.step) for a in exploding) == [("lin1", 3), ("lin2", 3)]
    for a in exploding:
        assert a.numbers["norm"] / a.numbers["reference_norm"] > 100


def test_exploding_gradient_norm_with_a_huge_learning_rate(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        alerts = run(model, writer, regression_batch(8), 6, opt=opt, every=1)
    exploding = [a for a in alerts if a.kind == "exploding_gradient"]
    assert exploding, alerts
    assert min(a.step for a in exploding) <= 2
    # Found before the run goes NaN.
    first_nonfinite = min((a.step for a in alerts if a.kind == "nonfinite"), default=10**9)
    assert min(a.step for a in exploding) < first_nonfinite


def test_stuck_parameters_with_a_zero_learning_rate(writer):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(frozen=nn.Linear(8, 16), act=nn.Tanh(), head=nn.Linear(16, 1)))
    opt = torch.optim.SGD(
        [{"params": model.frozen.parameters(), "lr": 0.0}, {"params": model.head.parameters()}], lr=0.01
    )
    alerts = run(model, writer, regression_batch(8), 4, opt=opt, every=2, optimizer=opt)
    stuck = [(a.where, a.step) for a in alerts if a.kind == "stuck_parameter"]
    assert sorted(stuck) == [("frozen.bias", 0), ("frozen.weight", 0)]
    assert all(a.numbers["update_ratio"] == 0.0 for a in alerts if a.kind == "stuck_parameter")


def test_saturated_sigmoid_from_huge_weights(writer):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(lin=nn.Linear(8, 16), sig=nn.Sigmoid(), out=nn.Linear(16, 1)))
    with torch.no_grad():
        model.lin.weight.mul_(100.0)
    alerts = run(model, writer, regression_batch(8), 2, every=1)
    saturated = [a for a in alerts if a.kind == "saturated_units"]
    assert [(a.where, a.step, a.module_type) for a in saturated] == [("sig", 0, "Sigmoid")], alerts
    assert saturated[0].numbers["saturated_fraction"] >= 0.5


def test_saturated_tanh_every_unit(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(50.0)  # every unit at +1 for every sample
    alerts = run(model, writer, regression_batch(8), 1, every=1)
    saturated = [a for a in alerts if a.kind == "saturated_units"]
    assert [(a.where, a.numbers["saturated_fraction"]) for a in saturated] == [("1", 1.0)]


def test_health_checks_run_on_logging_steps_only(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def kill(step):
        if step == 3:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)

    with watch(model, writer, every=5, thresholds={"dead_min_samples": 8}, **QUIET) as w:
        for step in range(8):
            kill(step)
            x, y = regression_batch(8)()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert [(a.kind, a.where, a.step) for a in w.alerts if a.kind == "dead_units"] == [("dead_units", "1", 5)]


def test_findings_are_reported_once_per_kind_and_place(writer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    alerts = run(model, writer, regression_batch(8), 5, every=1)
    keys = [(a.kind, a.where) for a in alerts]
    assert len(keys) == len(set(keys))
    assert ("dead_units", "1") in keys


# =========================================================================== grad-flow figure
def test_grad_flow_image_after_close(logdir):
    torch.manual_seed(0)
    model = deep_sigmoid_mlp(depth=4)
    run(model, str(logdir), regression_batch(32), 3, every=1)
    acc = read_events(logdir)
    assert "diagnostics/grad_flow" in acc.Tags()["images"]
    images = acc.Images("diagnostics/grad_flow")
    last = images[-1]
    assert last.step == 2  # drawn at close, for the last logged step
    assert 500 <= last.width <= 4000 and 300 <= last.height <= 2000
    assert last.width >= last.height
    assert last.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_flow_drawn_on_a_gradient_alert(logdir):
    torch.manual_seed(0)
    model = deep_sigmoid_mlp()
    run(model, str(logdir), regression_batch(32), 3, every=1)
    acc = read_events(logdir)
    steps = [e.step for e in acc.Images("diagnostics/grad_flow")]
    assert steps[0] == 0  # the vanishing alert at step 0 drew it at once
    assert steps[-1] == 2


def test_no_grad_flow_without_gradients(logdir):
    torch.manual_seed(0)
    model = deep_sigmoid_mlp(depth=2)
    with watch(model, str(logdir), every=1, log=("activations", "weights"), **QUIET):
        for _ in range(2):
            model(torch.randn(4, 32)).sum().backward()
    acc = read_events(logdir)
    assert "diagnostics/grad_flow" not in acc.Tags()["images"]


def test_grad_flow_not_redrawn_while_a_finding_persists(logdir):
    """Each finding is reported once, so the figure is drawn once for it (a figure costs ~0.2 s):
    a layer that keeps getting no gradient must not redraw it on every logging step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # layer 0 gets a zero gradient on every step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    alerts = run(model, str(logdir), regression_batch(8), 6, opt=opt, every=1)
    gradient_findings = [a for a in alerts if a.kind.endswith("_gradient")]
    assert [(a.kind, a.where, a.step) for a in gradient_findings] == [("vanishing_gradient", "0", 0)]
    acc = read_events(logdir)
    steps = [e.step for e in acc.Images("diagnostics/grad_flow")]
    assert steps == [0, 5]  # at the finding, and at close


# --------------------------------------------------------------------------- numbers on a finding
class Holes(nn.Module):
    """Writes NaN into ``count`` entries of its input on the chosen steps (the training loop sets
    ``step``: the fault is the step's, and a replay meets it again)."""

    def __init__(self, at: set[int], count: int = 5) -> None:
        super().__init__()
        self.at, self.count, self.step = set(at), count, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.at:
            x = x.clone()
            x.view(-1)[: self.count] = float("nan")
        return x


def holes_net(at: set[int]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(lin1=nn.Linear(4, 8), holes=Holes(at), lin2=nn.Linear(8, 1)))


def watch_holes(model: nn.Module, writer, every: int, steps: int, check_mode: str = "replay"):
    """Train ``model`` under watch with NaN warnings silenced; the watcher, closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=every, check_mode=check_mode, **QUIET) as w:
            train_skipping_nonfinite(
                model,
                steps,
                lambda s: (torch.randn(6, 4), torch.randn(6, 1)),
                before_step=lambda s: setattr(model.holes, "step", s),
            )
    return w


MODES = pytest.mark.parametrize("check_mode", ["replay", "per_module"])


@MODES
def test_forward_finding_gets_its_numbers(writer, check_mode):
    """The replay reads the bad values in full; the per-module check reads them from the step's
    histograms: the same numbers."""
    torch.manual_seed(0)
    model = holes_net(at={1})
    seen = {}
    model.lin1.register_forward_hook(lambda m, a, out: seen.setdefault(model.holes.step, out.detach().clone()))
    w = watch_holes(model, writer, every=1, steps=3, check_mode=check_mode)
    [alert] = w.alerts
    assert (alert.where, alert.step) == ("holes", 1)
    n = alert.numbers
    assert n.get("at_step", 1) == 1 and n["nonfinite_values"] == 5 and n["values"] == 6 * 8
    assert ("at_step" in n) == (check_mode == "per_module")  # the replay's numbers are the step's own
    lin1_out = seen[1]
    rest = lin1_out.reshape(-1)[5:]
    assert n["finite_min"] == pytest.approx(rest.min().item()) and n["finite_max"] == pytest.approx(rest.max().item())
    assert n["upstream_min"] == pytest.approx(lin1_out.min().item())  # the input it read: lin1's output
    assert n["upstream_max"] == pytest.approx(lin1_out.max().item())
    assert "5 of 48 values non-finite" in w.report()


@MODES
def test_forward_finding_off_cadence_gets_numbers(writer, check_mode):
    """Off the logging cadence the replay still has the step's own numbers; the per-module check
    takes them from the next step (always logged after a finding) when the fault is still there."""
    torch.manual_seed(0)
    model = holes_net(at={3, 4})  # step 3 is not a logging step; step 4 is logged because of it
    w = watch_holes(model, writer, every=100, steps=6, check_mode=check_mode)
    [alert] = w.alerts
    assert (alert.where, alert.step) == ("holes", 3)
    assert alert.numbers.get("at_step") == (4 if check_mode == "per_module" else None)
    assert alert.numbers["nonfinite_values"] == 5


@MODES
def test_transient_finding_off_cadence(writer, check_mode):
    """A fault gone by the next step: the replay measured it; the per-module check has nothing to
    read and makes nothing up."""
    torch.manual_seed(0)
    model = holes_net(at={3})
    w = watch_holes(model, writer, every=100, steps=6, check_mode=check_mode)
    [alert] = w.alerts
    if check_mode == "replay":
        assert alert.numbers["nonfinite_values"] == 5
        assert "[replayed: 5 of 48 values non-finite" in w.report()
    else:
        assert "nonfinite_values" not in alert.numbers
        assert "values non-finite" not in w.report()


@MODES
def test_backward_finding_gets_its_numbers(writer, check_mode):
    torch.manual_seed(0)
    model = norm_net(WithNorm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, writer, every=1, check_mode=check_mode, **QUIET) as w:
            train_skipping_nonfinite(model, 4, padded_batch)
    [alert] = w.alerts
    assert (alert.where, alert.phase, alert.step) == ("norm", "backward", 2)
    n = alert.numbers
    assert n.get("at_step", 2) == 2 and n["values"] == 6 * 8  # the gradient norm passed back to lin1's output
    assert 1 <= n["nonfinite_values"] <= 8  # the zero row's entries
    assert math.isfinite(n["upstream_min"]) and math.isfinite(n["upstream_max"])


# =========================================================================== NaN gradients and NaN weights, in words
class EmbedHead(nn.Module):
    """Token embedding and a linear head; a batch of 4 tokens reaches 4 of the 64 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 8)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(self.emb(x)).squeeze(-1)


TOKENS = torch.tensor([[0, 1, 2, 3]])


def nan_loss_at_step_0(model: nn.Module, steps: int, on_step=None) -> None:
    """SGD steps whose first loss is NaN: every gradient that step is NaN where it is not zero,
    and the optimizer step writes NaN into the rows it touched."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = model(TOKENS).sum() * (NAN if step == 0 else 1.0)
        opt.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step(step)
        opt.step()


def host_step(step: int, kind: str, named: dict[str, torch.Tensor]):
    """The HostStep the watcher's StepBuffer makes of these tensors under ``{kind}/{name}``."""
    from introspect.records.step import StepBuffer
    from introspect.records.tags import tag

    buffer = StepBuffer(step=step, logging=True, checking=False)
    for name, tensor in named.items():
        buffer.add_histogram(tag(kind, name), tensor.detach())
    return buffer.to_host()


def layer_sums(histograms) -> dict[str, tuple[float, float]]:
    """Per-layer (sum of squares, finite count) of the grads/ records, as the watcher sums them."""
    sums: dict[str, list[float]] = {}
    for full_tag, record in histograms.items():
        kind, _, name = full_tag.partition("/")
        if kind == "grads":
            entry = sums.setdefault(name.rpartition(".")[0] or name, [0.0, 0.0])
            entry[0] += record.sum_squares
            entry[1] += record.finite_count
    return {k: (v[0], v[1]) for k, v in sums.items()}


def test_a_nan_gradient_is_not_called_vanishing():
    from introspect.debugger.origins import nonfinite_gradients

    torch.manual_seed(0)
    model = EmbedHead()
    grads = {}
    nan_loss_at_step_0(model, 1, lambda step: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    host = host_step(0, "grads", grads)
    assert host.histograms["grads/emb.weight"].nonfinite == 32  # 4 rows of 8; the other 480 values are 0
    sums = layer_sums(host.histograms)
    # What the watcher concludes without the NaN counts: the finite rest is all zero, "vanishing".
    assert kinds_at(GradientHealth(Thresholds()).check(0, sums, {}), "vanishing_gradient") == ["emb"]
    counts = nonfinite_gradients(host.histograms)
    assert counts == {"emb": 32.0, "fc": 9.0}
    assert GradientHealth(Thresholds()).check(0, sums, {}, nonfinite=counts) == []


def test_a_layer_with_nan_gradient_is_left_out_of_the_median_and_the_history():
    # RMS: a 0.1, d 0.03, c ~1e-11 over its finite values (which NaN makes meaningless)
    layers = {"a": (1.0, 100.0), "c": (1e-20, 50.0), "d": (0.09, 100.0)}
    limits = Thresholds(vanishing_ratio=0.5)
    # With c, d's reference is the median of a and c (0.05): d is fine, c "vanishes".
    assert kinds_at(GradientHealth(limits).check(0, layers, {}), "vanishing_gradient") == ["c"]
    # Without c, d is measured against a alone (0.1) and is half of it at most: vanishing.
    health = GradientHealth(limits)
    assert kinds_at(health.check(0, layers, {}, nonfinite={"c": 50.0, "a": 0.0}), "vanishing_gradient") == ["d"]
    assert set(health.history) == {"a", "d"}


def test_a_nan_gradient_under_watch_is_not_called_vanishing(tmp_path):
    torch.manual_seed(0)
    model = EmbedHead()
    with watch(model, tmp_path, every=1, **QUIET) as w, warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        nan_loss_at_step_0(model, 1)
    # the one finding is the non-finite check's: the loss made the NaN gradient
    assert [(a.kind, a.where, a.phase) for a in w.alerts] == [("nonfinite", "fc", "backward")]


def test_nan_weights_are_named_as_such_not_as_the_modules_fault(tmp_path):
    """Through watch: the step after an optimizer step applied NaN gradients, the forward check
    names emb (finite token ids in, NaN out); with that step's weight records the finding says why."""
    from introspect.debugger.origins import blame_nonfinite_weights

    torch.manual_seed(0)
    model = EmbedHead()
    weights_at_1 = {}

    def keep_weights(step: int) -> None:
        if step == 1:  # the values step 1's forward used (the watcher records them as the step opens)
            weights_at_1.update({n: p.detach().clone() for n, p in model.named_parameters()})

    with watch(model, tmp_path, every=1, **QUIET) as w, warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        nan_loss_at_step_0(model, 2, keep_weights)
    origins = nonfinite(w.alerts)
    assert [(a.step, a.where, a.phase) for a in origins] == [(0, "fc", "backward"), (1, "emb", "forward")]
    # The watcher words it so itself (it reads emb's parameters on this firing path):
    assert origins[1].message.startswith("weights of emb (Embedding) are non-finite (since step 0's optimizer step)")
    histograms = host_step(1, "weights", weights_at_1).histograms
    blamed = blame_nonfinite_weights(origins[1], histograms, w.alerts)
    assert blamed.message == (
        "weights of emb (Embedding) are non-finite (since step 0's optimizer step): emb.weight has 32 of "
        "512 values NaN/Inf; its inputs were finite, its output is not because of them"
    )
    assert (blamed.kind, blamed.where, blamed.step, blamed.phase) == ("nonfinite", "emb", 1, "forward")
    assert blamed.numbers["nonfinite_weights"] == 32 and blamed.numbers["since_step"] == 0
    # Without an earlier finding (NaN weights loaded from a checkpoint, say): no step to blame.
    assert "(already when step 1 began)" in blame_nonfinite_weights(origins[1], histograms).message
    # Finite weights, a backward finding or the input: unchanged.
    finite = host_step(1, "weights", {n: torch.zeros(3) for n in weights_at_1}).histograms
    assert blame_nonfinite_weights(origins[1], finite, w.alerts) is origins[1]
    assert blame_nonfinite_weights(origins[0], histograms, w.alerts) is origins[0]


def test_nan_weights_under_watch_are_named_as_such(tmp_path):
    torch.manual_seed(0)
    model = EmbedHead()
    with watch(model, tmp_path, every=1, **QUIET) as w, warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        nan_loss_at_step_0(model, 2)
    step_1 = [a for a in nonfinite(w.alerts) if a.step == 1]
    assert step_1[0].message.startswith("weights of emb (Embedding) are non-finite (since step 0's optimizer step)")


def test_later_outputs_singular_and_plural():
    calls = chain("a", "b", "c")
    one = locate_nonfinite(0, calls[:2], [Check("in", 0), Check("out", 0, "a"), Check("out", 1, "b")], [1.0, NAN, NAN])
    assert one.message.endswith("; 1 later module output inherits it")
    two = locate_nonfinite(
        0,
        calls,
        [Check("in", 0), Check("out", 0, "a"), Check("out", 1, "b"), Check("out", 2, "c")],
        [1.0, NAN, NAN, NAN],
    )
    assert two.message.endswith("; 2 later module outputs inherit it")


def test_median_without_equals_the_median_of_the_others():
    """Each layer is judged against the median of the other layers; the O(log n) shortcut must
    give exactly what the list without that layer gives, ties and all."""
    import random
    import statistics

    from introspect.debugger.health import median_without

    rng = random.Random(0)
    for _ in range(500):
        values = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(rng.randint(2, 9))]
        ranked = sorted(values)
        for i, value in enumerate(values):
            assert median_without(ranked, value) == statistics.median(values[:i] + values[i + 1 :])

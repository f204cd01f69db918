"""The public ``introspect.Probe``: a user's own statistics, written as ``{name}/{key}/{module}``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import introspect
from introspect import (
    ConfigError,
    ConfigTypeError,
    IntrospectWarning,
    Probe,
    ProbeError,
    watch,
)
from tests.support import QUIET
from tests.support.events import read_events, scalar_tags
from tests.support.hooks import hook_state


class AbsMax(Probe):
    name = "absmax"

    def select(self, name, module):
        return isinstance(module, nn.Linear)

    def on_output(self, name, module, output):
        return {"out": output.abs().amax(), "rows": float(output.shape[0])}


class GradRMS(Probe):
    name = "gradrms"

    def on_output_grad(self, name, module, grad):
        return {"rms": grad.pow(2).mean().sqrt()}


class Broken(Probe):
    name = "broken"

    def on_output(self, name, module, output):
        raise RuntimeError("my probe has a bug")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _steps(model: nn.Module, steps: int, recorded: dict | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(5, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _scalar(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_custom_probes_scalars_are_read_back(tmp_path):
    model = _mlp()
    expected: dict[tuple[str, int], float] = {}
    step = [0]

    def record(name):
        def hook(module, args, output):
            expected[(name, step[0])] = output.detach().abs().amax().item()

        return hook

    handles = [model[i].register_forward_hook(record(str(i))) for i in (0, 2)]
    torch.manual_seed(1)
    with watch(model, tmp_path / "run", every=2, probes=[AbsMax(), GradRMS()], **QUIET) as w:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(5):
            step[0] = i
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for h in handles:
        h.remove()
    acc = read_events(tmp_path / "run")
    tags = scalar_tags(acc)
    assert {"absmax/out/0", "absmax/out/2", "absmax/rows/0", "absmax/rows/2"} <= tags
    assert not [t for t in tags if t.startswith("absmax/") and t.endswith("/1")]  # ReLU not selected
    assert {"gradrms/rms/0", "gradrms/rms/1", "gradrms/rms/2"} <= tags  # default select: every module
    for module in ("0", "2"):
        values = _scalar(acc, f"absmax/out/{module}")
        assert [s for s, _ in values] == [0, 2, 4]  # logging steps only
        for s, value in values:
            assert value == pytest.approx(expected[(module, s)], rel=1e-6)
    assert [v for _, v in _scalar(acc, "absmax/rows/0")] == [5.0, 5.0, 5.0]
    assert all(v > 0 for _, v in _scalar(acc, "gradrms/rms/2"))
    assert w.probes[-2:][0].name == "absmax"


def test_a_probe_that_raises_warns_once_and_training_goes_on(tmp_path):
    model, twin = _mlp(), _mlp()
    before = hook_state(model)
    with pytest.warns(
        IntrospectWarning, match="probe 'broken' stopped after an error on 0 .*my probe has a bug"
    ) as caught:
        with watch(model, tmp_path / "run", every=1, probes=[Broken(), AbsMax()], **QUIET):
            torch.manual_seed(3)
            _steps(model, 3)
    assert len([c for c in caught if "broken" in str(c.message)]) == 1
    torch.manual_seed(3)
    _steps(twin, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # training untouched
    assert hook_state(model) == before
    acc = read_events(tmp_path / "run")
    assert [s for s, _ in _scalar(acc, "absmax/out/0")] == [0, 1, 2]  # the other probe goes on
    assert not [t for t in scalar_tags(acc) if t.startswith("broken/")]


def test_strict_turns_a_failing_probe_into_probe_error(tmp_path):
    model = _mlp()
    before = hook_state(model)
    with pytest.raises(ProbeError, match="probe 'broken' failed on 0"):
        with watch(model, tmp_path / "run", every=1, strict=True, probes=[Broken()], **QUIET):
            _steps(model, 1)
    assert hook_state(model) == before


class NotAScalar(Probe):
    name = "wide"

    def on_output(self, name, module, output):
        return {"all": output}  # a whole tensor: not a scalar


def test_a_value_that_is_not_one_number_disables_the_probe(tmp_path):
    with pytest.warns(IntrospectWarning, match="probe 'wide' stopped"):
        with watch(_mlp(), tmp_path / "run", every=1, probes=[NotAScalar()], **QUIET) as w:
            _steps(w.model, 2)


@pytest.mark.parametrize(
    "probes, error, words",
    [
        ([object()], ConfigTypeError, "introspect.Probe"),
        ([type("Nameless", (Probe,), {})()], ConfigError, "non-empty tag prefix"),
        ([type("Slash", (Probe,), {"name": "a/b"})()], ConfigError, "without '/'"),
        ([AbsMax(), AbsMax()], ConfigError, "two probes with one name"),
    ],
)
def test_bad_probes_are_refused_before_any_hook(tmp_path, probes, error, words):
    model = _mlp()
    before = hook_state(model)
    with pytest.raises(error, match=words):
        watch(model, tmp_path / "run", probes=probes, **QUIET)
    assert hook_state(model) == before
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_off_cadence_a_probe_is_never_called(tmp_path):
    calls = []

    class Counting(Probe):
        name = "count"

        def on_output(self, name, module, output):
            calls.append(name)

    with watch(_mlp(), tmp_path / "run", every=10, probes=[Counting()], **QUIET) as w:
        _steps(w.model, 12)
    assert sorted(set(calls)) == ["0", "1", "2"]  # every watched module (the bare Sequential is not)
    assert len(calls) == 2 * 3  # steps 0 and 10 only


def test_probe_is_exported():
    assert introspect.Probe is Probe
    assert "Probe" in introspect.__all__


# --------------------------------------------------------------------------- the step-level events
class Recorder(Probe):
    """Every event, in the order it arrives (module events with their module's name)."""

    name = "recorder"
    wants_param_grads = True

    def __init__(self):
        self.events: list[str] = []

    def select(self, name, module):
        return isinstance(module, nn.Linear)

    def on_first_batch(self, module, args, kwargs):
        self.events.append("on_first_batch")

    def on_step_start(self, plan):
        self.events.append("on_step_start")

    def on_forward(self, args, kwargs):
        self.events.append("on_forward")

    def on_forward_end(self, output):
        self.events.append("on_forward_end")

    def on_output(self, name, module, output):
        self.events.append(f"on_output {name}")

    def on_output_grad(self, name, module, grad):
        self.events.append(f"on_output_grad {name}")

    def on_param_grad(self, name, param):
        assert param.grad is not None
        self.events.append(f"on_param_grad {name}")

    def on_after_backward(self):
        self.events.append("on_after_backward")

    def on_after_reduction(self):
        self.events.append("on_after_reduction")

    def on_before_optimizer_step(self):
        self.events.append("on_before_optimizer_step")

    def on_after_optimizer_step(self):
        self.events.append("on_after_optimizer_step")

    def on_step_end(self, host):
        self.events.append("on_step_end" if host is not None else "on_step_end without records")

    def on_close(self, failed):
        self.events.append("on_close")


PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("optimizer", [False, True], ids=["forward-steps", "optimizer-steps"])
def test_a_probe_hears_every_event_in_order(tmp_path, optimizer):
    model, recorder = _mlp(), Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watched = {"optimizer": opt} if optimizer else {}
    with watch(model, tmp_path / "run", every=1, probes=[recorder], **watched, **QUIET):
        _steps_with(model, opt, 3)
    events = recorder.events
    assert events[0] == "on_first_batch" and events[-1] == "on_close"
    starts = [i for i, e in enumerate(events) if e == "on_step_start"]
    assert len(starts) == 3
    for begin, end in zip(starts, [*starts[1:], len(events) - 1]):
        step = events[begin:end]
        forward_end, after_backward = step.index("on_forward_end"), step.index("on_after_backward")
        # Inside the backward, autograd's order (whatever it is): each output's and parameter's gradient once.
        assert sorted(step[forward_end + 1 : after_backward]) == sorted(
            ["on_output_grad 0", "on_output_grad 2"] + [f"on_param_grad {p}" for p in PARAMS]
        )
        assert step[: forward_end + 1] == [
            "on_step_start",
            "on_forward",
            "on_output 0",
            "on_output 2",
            "on_forward_end",
        ]
        assert step[after_backward:] == [
            "on_after_backward",
            "on_after_reduction",
            *(["on_before_optimizer_step", "on_after_optimizer_step"] if optimizer else []),
            "on_step_end",
        ]


def test_the_end_of_backward_events_need_no_other_hook(tmp_path):
    """A probe with only the end-of-backward events hears them once per backward: the watcher
    marks the backward from the model's output, with no module- or parameter-gradient hook."""
    heard = []

    class EndOfBackward(Probe):
        name = "end_of_backward"

        def on_after_backward(self):
            heard.append("backward")

        def on_after_reduction(self):
            heard.append("reduction")

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # log=weights: no built-in probe hooks an output's or a parameter's gradient either.
    with watch(model, tmp_path / "run", every=1, log="weights", optimizer=opt, probes=[EndOfBackward()], **QUIET):
        for _ in range(2):
            for _ in range(2):  # two accumulated backwards per optimizer step
                model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean()  # a forward without backward: no event
    assert heard == ["backward", "reduction"] * 4


def test_an_old_event_name_still_works_with_one_deprecation_warning(tmp_path):
    calls = []
    with pytest.warns(DeprecationWarning) as caught:

        class OldNames(Probe):
            name = "old"

            def on_optimizer_pre(self):
                calls.append("before")

            def on_optimizer_step(self):
                calls.append("after")

    messages = sorted(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    assert len(messages) == 2
    assert "OldNames.on_optimizer_pre is deprecated" in messages[0] and "on_before_optimizer_step" in messages[0]
    assert "OldNames.on_optimizer_step is deprecated" in messages[1] and "on_after_optimizer_step" in messages[1]
    assert all(w.filename == __file__ for w in caught)  # the user's class, not introspect's code
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # not again on every step
        with watch(model, tmp_path / "run", every=1, optimizer=opt, probes=[OldNames()], **QUIET):
            _steps_with(model, opt, 3)
    assert calls == ["before", "after"] * 3


def _steps_with(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_param_grads_reach_only_a_probe_that_wants_them(tmp_path):
    wanted, unwanted = [], []

    class Wants(Probe):
        name = "wants"
        wants_param_grads = True

        def on_param_grad(self, name, param):
            wanted.append((name, param.grad.norm().item()))

    class DoesNotAsk(Probe):
        name = "does_not_ask"

        def on_param_grad(self, name, param):
            unwanted.append(name)

    model = _mlp()
    grad_norms = []
    with pytest.warns(
        IntrospectWarning, match="'does_not_ask' defines on_param_grad but its wants_param_grads is False"
    ):
        with watch(model, tmp_path / "run", every=2, probes=[Wants(), DoesNotAsk()], **QUIET):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                loss = model(torch.randn(5, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                grad_norms.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
                opt.step()
    assert unwanted == []
    # Logging steps 0 and 2, in that order, each parameter's accumulated gradient once.
    assert sorted(wanted[:4]) == sorted((name, grad_norms[0][name]) for name in PARAMS)
    assert sorted(wanted[4:]) == sorted((name, grad_norms[2][name]) for name in PARAMS)

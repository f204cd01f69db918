"""The public ``introspect.Probe``: a user's own statistics, written as ``{name}/{key}/{module}``."""

from __future__ import annotations

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

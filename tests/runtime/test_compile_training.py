"""watch() never breaks a compiled training run, whatever the model returns: a (loss, logits)
tuple, a Hugging Face ``ModelOutput``, a tuple with an integer tensor, a causal LM called with
``labels=``. Under ``torch.compile`` the outputs that the loss does not use get no gradient (they
leave the compiled graph beside the loss, not upstream of it): the output-gradient hooks receive
``None`` there. Each case trains bitwise as its unwatched twin (compiled against compiled, eager
against eager) and names a NaN planted in one module at that module and step, under both
``check_mode``s. CPU inductor needs a C++ compiler; each compiled case takes seconds to a minute
on a busy 2-core runner."""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import watch
from introspect.runtime.compiled import COMPILED_WARNING
from tests.support import QUIET
from tests.support.hf_models import tiny_decoder
from tests.support.hooks import hook_state
from tests.support.training import assert_same_state

transformers = pytest.importorskip("transformers")

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
NAN_STEP, STEPS = 3, 4


class Fault(nn.Module):
    """Multiplies by a buffer (a tensor, not a Python flag: the compiled code does not recompile
    when the test plants the NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Net(nn.Module):
    """Computes its own loss and returns it with the logits, in one of three shapes."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output
        self.lin1, self.act, self.fault, self.lin2 = nn.Linear(6, 16), nn.Tanh(), Fault(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        logits = self.lin2(self.fault(self.act(self.lin1(x))))
        loss = F.cross_entropy(logits, y)
        if self.output == "loss_logits":
            return loss, logits
        if self.output == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(loss=loss, logits=logits)
        return loss, logits, logits.argmax(-1)  # an integer tensor among the outputs


def _loss(output) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return output.loss if hasattr(output, "loss") else output[0]


def _run(model: nn.Module, how: str) -> nn.Module:
    if how == "torch.compile":
        return torch.compile(model)
    if how == "module.compile()":
        model.compile()
    return model


def _train_pair(model, fault, batches, how, tmp_path, **options):  # type: ignore[no-untyped-def]
    """Train ``model`` under watch and its twin without, in lockstep; plant a NaN at NAN_STEP.
    Returns the watcher, the losses (watched, twin) before the NaN, and the models."""
    import torch._dynamo

    torch._dynamo.reset()
    twin = copy.deepcopy(model)
    twin_fault = fault(twin)
    run, run_twin = _run(model, how), _run(twin, how)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    before = hook_state(model, opt)
    losses, twin_losses = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(run, tmp_path / "run", every=2, optimizer=opt, **QUIET, **options) as w:
            for step, kwargs in enumerate(batches):
                for f in (fault(model), twin_fault):
                    f.scale.fill_(float("nan") if step == NAN_STEP else 1.0)
                for r, o, kept in ((run, opt, losses), (run_twin, opt_twin, twin_losses)):
                    loss = _loss(r(**kwargs))
                    o.zero_grad()
                    loss.backward()
                    o.step()
                    if step < NAN_STEP:
                        kept.append(loss.detach().clone())
                if step < NAN_STEP:
                    assert_same_state(model, twin)
    assert hook_state(model, opt) == before
    return w, losses, twin_losses


def _batches(steps: int = STEPS) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [dict(x=torch.randn(8, 6, generator=g), y=torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def _nonfinite(w) -> list[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return [(a.where, a.step, a.phase) for a in w.alerts if a.kind == "nonfinite"][:1]


CASES = [
    pytest.param(output, how, mode, marks=[pytest.mark.slow, needs_compiler] if how != "eager" else [])
    for output in ("loss_logits", "model_output", "int_tuple")
    for how in ("eager", "torch.compile")
    for mode in ("replay", "per_module")
] + [
    pytest.param("loss_logits", "module.compile()", mode, marks=[pytest.mark.slow, needs_compiler])
    for mode in ("replay", "per_module")
]


@pytest.mark.parametrize("output, how, mode", CASES)
def test_training_is_unchanged_and_the_nan_named(output, how, mode, tmp_path):
    torch.manual_seed(0)
    w, losses, twin_losses = _train_pair(Net(output), lambda m: m.fault, _batches(), how, tmp_path, check_mode=mode)
    assert [x.item() for x in losses] == [x.item() for x in twin_losses]  # bitwise (floats compare exactly)
    assert all(torch.equal(a, b) for a, b in zip(losses, twin_losses))
    assert _nonfinite(w) == [("fault", NAN_STEP, "forward")]


def test_ten_line_model_trains_eagerly_with_an_unused_output(tmp_path):
    """Eager autograd gives ``None`` to the hook of an output that no gradient reaches when it is
    one of a node's several outputs (``split``): no probe may fail on it."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
            a, b = self.lin(x).split(2, dim=1)
            return a.sum(), b

    model = Split()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no probe may stop with a warning
        for mode in ("replay", "per_module"):
            with watch(model, tmp_path / mode, every=1, check_mode=mode, **QUIET) as w:
                for _ in range(3):
                    loss, _ = model(torch.randn(3, 4))
                    loss.backward()
            assert w.alerts == []


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("mode", ["replay", "per_module"])
def test_causal_lm_with_labels_under_compile(mode, tmp_path):
    """The issue's crash: a transformers causal LM called with ``labels=``, compiled, watched."""
    model = tiny_decoder("llama", positions=32)

    class FaultyAct(Fault):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(x) * self.scale

    model.model.layers[1].mlp.act_fn = FaultyAct()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        batches.append(dict(input_ids=ids, labels=ids))
    w, losses, twin_losses = _train_pair(
        model, lambda m: m.model.layers[1].mlp.act_fn, batches, "torch.compile", tmp_path, check_mode=mode
    )
    assert all(torch.equal(a, b) for a, b in zip(losses, twin_losses))
    assert _nonfinite(w) == [("model.layers.1.mlp.act_fn", NAN_STEP, "forward")]


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("mode", ["replay", "per_module"])
def test_compiled_autograd_trains_and_names_the_nan(mode, tmp_path):
    """Compiled autograd (a backward inside compiled code with ``compiled_autograd=True``) fails on
    a tensor hook whose output gets no gradient and refuses ``queue_callback``: the sentinel hooks
    no output there and reads the gradients before ``optimizer.step()`` (``optimizer=``)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net("loss_logits")
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)

    def step_of(m):  # type: ignore[no-untyped-def]
        @torch.compile
        def step(x, y):  # type: ignore[no-untyped-def]
            loss, _ = m(x, y)
            loss.backward()
            return loss

        return step

    losses = []
    with contextlib.ExitStack() as undo, warnings.catch_warnings():
        # Set before torch.compile wraps the step (it reads the switch then), and set back after.
        torch._dynamo.config.compiled_autograd = True
        undo.callback(setattr, torch._dynamo.config, "compiled_autograd", False)
        step, step_twin = step_of(model), step_of(twin)
        warnings.simplefilter("ignore")
        with watch(model, tmp_path / "run", every=2, optimizer=opt, check_mode=mode, **QUIET) as w:
            for i, batch in enumerate(_batches()):
                for m in (model, twin):
                    m.fault.scale.fill_(float("nan") if i == NAN_STEP else 1.0)
                pair = []
                for s, o in ((step, opt), (step_twin, opt_twin)):
                    o.zero_grad()
                    pair.append(s(**batch).detach())
                    o.step()
                if i < NAN_STEP:
                    losses.append(pair)
                    assert_same_state(model, twin)
    assert counters["compiled_autograd"]["captures"] > 0  # the backward did run under compiled autograd
    assert all(torch.equal(a, b) for a, b in losses)
    assert _nonfinite(w) == [("fault", NAN_STEP, "forward")]


def test_compile_warning_says_what_is_and_is_not_available():
    """The words are the contract: the NaN origin is named (by the eager replay), the per-layer
    histograms are not there."""
    assert "activations/" in COMPILED_WARNING and "replay" in COMPILED_WARNING
    assert "unavailable inside the compiled graph (weights" not in COMPILED_WARNING

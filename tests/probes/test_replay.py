"""The non-finite sentinel and its replay (check_mode="replay", the default): the same origin as
the per-module check on every fault, the replay invisible to training (RNG, buffers, .grad,
losses and weights bitwise as without watch), honest words when a step cannot be replayed, and no
replay at all on healthy steps."""

from __future__ import annotations

import copy
import math
import shutil
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import ConfigError, ConfigTypeError, NonFiniteError, NonFiniteWarning, watch
from tests.support import QUIET
from tests.support.hooks import hook_state

MODES = ("replay", "per_module")


class Fault(nn.Module):
    """Multiplies by ``value`` at the chosen steps; ``step`` is set by the training loop, so the
    fault belongs to the step (a bad batch, a bad weight) and a replay meets it again."""

    def __init__(self, at: set[int], value: float = float("nan")) -> None:
        super().__init__()
        self.at, self.value, self.step = set(at), value, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value if self.step in self.at else x


class SqrtAtZero(nn.Module):
    """Forward finite (sqrt(0) = 0), backward Inf (d sqrt/dx at 0), at the chosen steps."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.at, self.step = set(at), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.at:
            x = torch.cat([(x[:, :1] - x[:, :1].detach()).sqrt(), x[:, 1:]], dim=1)
        return x


class Unwatched(nn.Module):
    """A parent whose own forward does functional work between two watched children."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.at, self.step = set(at), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.step in self.at:
            h = torch.log(h - h.max() - 1)  # log of a negative number: NaN, made by no module
        return self.b(h)


class SqrtLinear(nn.Linear):
    """A Linear whose output gets + sqrt(y - y.detach()) at the chosen steps: its own backward
    sends Inf/NaN to its input."""

    def __init__(self, *args, at: set[int]) -> None:
        super().__init__(*args)
        self.at, self.step = set(at), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + (y - y.detach()).sqrt() if self.step in self.at else y


class PoolFlattenFc(nn.Module):
    """conv -> pool -> x.flatten(1) (functional, a view) -> fc1 -> fc2: fc1 reads pool's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = SqrtLinear(16, 8, at={2}), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.pool(self.conv(x)).flatten(1))))


def set_step(model: nn.Module, step: int) -> None:
    for module in model.modules():
        if hasattr(module, "at"):
            module.step = step


def mlp(fault: nn.Module) -> nn.Module:
    return nn.Sequential(
        OrderedDict(lin1=nn.Linear(4, 8), act=nn.Tanh(), fault=fault, lin2=nn.Linear(8, 8), out=nn.Linear(8, 1))
    )


def bn_dropout_cnn(fault: nn.Module) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, padding=1),
            bn=nn.BatchNorm2d(8),
            relu=nn.ReLU(),
            drop=nn.Dropout(0.3),
            fault=fault,
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(8, 1),
        )
    )


FAULTS = {
    "forward_nan": lambda: mlp(Fault({2})),
    "forward_inf": lambda: mlp(Fault({2}, float("inf"))),
    "backward_only": lambda: mlp(SqrtAtZero({2})),
    "unwatched_code": lambda: nn.Sequential(
        OrderedDict(lin1=nn.Linear(4, 8), block=Unwatched({2}), out=nn.Linear(8, 1))
    ),
    "cnn_forward_nan": lambda: bn_dropout_cnn(Fault({2})),
    "backward_after_a_view": PoolFlattenFc,
}


def batch_for(model: nn.Module, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    shape = (4, 3, 6, 6) if isinstance(next(model.children()), nn.Conv2d) else (6, 4)
    return torch.randn(*shape, generator=gen), torch.randn(shape[0], 1, generator=gen)


def train_careful(model: nn.Module, steps: int, opt: torch.optim.Optimizer, record: list | None = None) -> list:
    """The loop careful users write: skip optimizer.step() when the loss or a gradient is not finite."""
    losses = []
    for step in range(steps):
        set_step(model, step)
        x, y = batch_for(model, step)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.detach().clone())
        if record is not None:
            record.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        if torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
    return losses


def findings(model_fn, check_mode: str, tmp_path, steps: int = 4):
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path / check_mode, every=10**9, check_mode=check_mode, **QUIET) as w:
            train_careful(model, steps, opt)
    return [a for a in w.alerts if a.kind == "nonfinite"]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_replay_names_what_the_per_module_check_names(tmp_path, fault):
    """Every planted fault: the replay's finding is the per-module check's (module, step, phase,
    words), with the bad values' numbers on top."""
    replayed = findings(FAULTS[fault], "replay", tmp_path)
    checked = findings(FAULTS[fault], "per_module", tmp_path)
    assert [(a.where, a.step, a.phase, a.message) for a in replayed] == [
        (a.where, a.step, a.phase, a.message) for a in checked
    ]
    assert [a.step for a in replayed] == [2], replayed
    expected = {
        "forward_nan": "fault",
        "forward_inf": "fault",
        "backward_only": "fault",
        "unwatched_code": "block.b",
        "cnn_forward_nan": "fault",
        "backward_after_a_view": "fc1",
    }[fault]
    assert replayed[0].where == expected
    if fault != "unwatched_code":
        assert replayed[0].numbers["nonfinite_values"] > 0


def test_replay_is_invisible_to_training(tmp_path):
    """Dropout and BatchNorm, a NaN at step 3 under on_nonfinite="warn", a loop that skips the
    update on a non-finite loss: every loss, gradient, weight and buffer afterwards is bitwise what
    an unwatched twin running the same loop gets (the replay restored RNG, buffers and .grad)."""
    torch.manual_seed(0)
    model = bn_dropout_cnn(Fault({3}))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    grads: list = []
    grads_twin: list = []
    torch.manual_seed(1)
    with pytest.warns(NonFiniteWarning, match="fault"):
        with watch(model, tmp_path / "run", every=10**9, optimizer=opt, **QUIET) as w:
            losses = train_careful(model, 8, opt, grads)
    rng_after = torch.get_rng_state()
    torch.manual_seed(1)
    losses_twin = train_careful(twin, 8, opt_twin, grads_twin)
    assert torch.equal(torch.get_rng_state(), rng_after)
    [alert] = [a for a in w.alerts if a.kind == "nonfinite"]
    assert (alert.where, alert.step, alert.phase) == ("fault", 3, "forward")
    assert not math.isfinite(losses[3].item())
    for step, (a, b) in enumerate(zip(losses, losses_twin)):
        assert torch.equal(a, b) or (step == 3 and a.isnan() and b.isnan()), step
    for step, (a, b) in enumerate(zip(grads, grads_twin)):
        for name in a:
            assert (
                torch.equal(
                    a[name],
                    b[name],
                )
                or step == 3
            ), (step, name)
            if step == 3:
                assert torch.equal(a[name].isnan(), b[name].isnan()), name
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm's running statistics


def test_healthy_steps_are_never_replayed(tmp_path):
    calls = []
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model[1].register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch(model, tmp_path / "run", every=10**9, **QUIET) as w:
            for _ in range(10):
                F.mse_loss(model(torch.randn(5, 4)), torch.randn(5, 1)).backward()
                opt.step()
                opt.zero_grad()
    assert len(calls) == 10 and w.alerts == []


class CallCounted(nn.Module):
    """A fault tied to a call counter: a side effect in forward, which a replay cannot repeat."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.at, self.calls = set(at), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, self.calls = self.calls, self.calls + 1
        return x * float("nan") if i in self.at else x


@pytest.mark.parametrize("check_mode", MODES)
def test_a_step_that_cannot_be_replayed_says_so(tmp_path, check_mode):
    """The replay re-runs forward: state the forward changes (a call counter) makes the replayed
    step finite. The finding says what the sentinel saw and why no layer is named; the
    per-module check, for such models, names it."""
    torch.manual_seed(0)
    model = mlp(CallCounted({1}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path / "run", every=10**9, check_mode=check_mode, **QUIET) as w:
            for _ in range(3):
                F.mse_loss(model(torch.randn(6, 4)), torch.randn(6, 1)).backward()
                model.zero_grad()
    [alert] = [a for a in w.alerts if a.kind == "nonfinite"]
    assert alert.step == 1
    if check_mode == "per_module":
        assert alert.where == "fault"
    else:
        assert (alert.where, alert.phase) == ("output", "forward")
        assert alert.message.startswith("NaN in the model's output; the replay of this step could not name the layer")
        assert "its forward came out finite" in alert.message
        assert "check_mode='per_module'" in alert.message


def test_inputs_changed_in_place_after_the_forward(tmp_path):
    """A preallocated input buffer refilled for the next batch: a forward-only step is read when
    it ends (at the next forward), by which time its input holds the next batch. The replay sees
    the version counter moved and says so, rather than replaying the wrong batch."""
    torch.manual_seed(0)
    model = mlp(Fault({1}))
    x = torch.empty(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path / "run", every=10**9, **QUIET) as w:
            for step in range(3):
                set_step(model, step)
                x.copy_(torch.randn(6, 4))
                model(x)
    [alert] = [a for a in w.alerts if a.kind == "nonfinite"]
    assert (alert.where, alert.step) == ("output", 1)
    assert "the forward's inputs were changed in place after it" in alert.message


def test_raise_comes_from_backward_before_the_weights_change(tmp_path):
    torch.manual_seed(0)
    model = mlp(Fault({1}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_state(model, opt)
    with pytest.raises(NonFiniteError) as info:
        with watch(model, tmp_path / "run", on_nonfinite="raise", **QUIET):
            for step in range(3):
                set_step(model, step)
                loss = model(torch.randn(6, 4)).pow(2).mean()
                opt.zero_grad()
                weights = {k: v.clone() for k, v in model.state_dict().items()}
                loss.backward()
                opt.step()
    assert (info.value.alert.where, info.value.alert.step) == ("fault", 1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert hook_state(model, opt) == before


def test_gradients_not_zeroed_are_one_finding_not_one_per_step(tmp_path):
    """A NaN gradient accumulated into .grad (no zero_grad) stays NaN: named once, at its origin;
    later steps, whose own gradients are finite, are neither findings nor replayed."""
    torch.manual_seed(0)
    model = mlp(SqrtAtZero({1}))
    replays = []
    model.lin1.register_forward_hook(lambda *a: replays.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path / "run", every=10**9, **QUIET) as w:
            for step in range(5):
                set_step(model, step)
                model(torch.randn(6, 4)).pow(2).mean().backward()
    assert [(a.where, a.step) for a in w.alerts if a.kind == "nonfinite"] == [("fault", 1)]
    assert len(replays) == 5 + 2  # one replay at step 1, one at step 2 that finds .grad stale


def test_loss_and_logits_outputs_push_back_the_loss_gradient_once(tmp_path):
    """A model returning its loss and the logits it was computed from (as Hugging Face models do):
    the gradient seen at the logits already holds the loss's share; the replay pushes back the
    loss's alone, and finds the backward NaN where the per-module check does."""

    class LossAndLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(SqrtAtZero({1}))

        def forward(self, x, y):
            logits = self.body(x)
            return {"loss": F.mse_loss(logits, y), "logits": logits}

    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = LossAndLogits()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            with watch(model, tmp_path / mode, every=10**9, check_mode=mode, **QUIET) as w:
                for step in range(3):
                    set_step(model, step)
                    out = model(torch.randn(6, 4), torch.randn(6, 1))
                    (out["loss"] + 0.1 * out["logits"].pow(2).mean()).backward()
                    model.zero_grad()
        results[mode] = [(a.where, a.step, a.phase) for a in w.alerts if a.kind == "nonfinite"]
    assert results["replay"] == results["per_module"] == [("body.fault", 1, "backward")]


def test_gpt2_forward_nan_in_a_block(tmp_path):
    """A Hugging Face GPT-2 (loss and logits in a ModelOutput, dropout on): a NaN planted in one
    block's MLP by a forward hook is named where the per-module check names it."""
    hf = pytest.importorskip("hf_models")
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = hf.tiny_gpt2()
        model.config.resid_pdrop = model.config.attn_pdrop = 0.1
        fault = {"step": 0}
        model.transformer.h[1].mlp.c_fc.register_forward_hook(
            lambda m, a, out: out * float("nan") if fault["step"] == 2 else None  # noqa: B023  (reads the live dict)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWarning)
            with watch(model, tmp_path / mode, every=10**9, check_mode=mode, **QUIET) as w:
                for step in range(4):
                    fault["step"] = step
                    ids = hf.token_ids(2, seed=step)
                    model(input_ids=ids, labels=ids).loss.backward()
                    model.zero_grad()
        results[mode] = [(a.where, a.step, a.phase, a.message) for a in w.alerts if a.kind == "nonfinite"]
    assert results["replay"] == results["per_module"]
    assert [r[:3] for r in results["replay"]] == [("transformer.h.1.mlp.c_fc", 2, "forward")]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_model_gets_a_per_layer_origin(tmp_path):
    """torch.compile's graph has no per-module hooks; the replay runs the eager model, which does."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)

    class TensorFault(nn.Module):  # a buffer, not a Python flag: no recompilation per step
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(()))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(OrderedDict(lin1=nn.Linear(4, 8), act=nn.Tanh(), fault=TensorFault(), lin2=nn.Linear(8, 1)))
    compiled = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(compiled, tmp_path / "run", every=10**9, **QUIET) as w:
            for step in range(4):
                model.fault.scale.fill_(float("nan") if step == 2 else 1.0)
                compiled(torch.randn(6, 4)).pow(2).mean().backward()
                model.zero_grad()
    [alert] = [a for a in w.alerts if a.kind == "nonfinite"]
    assert (alert.where, alert.step, alert.phase) == ("fault", 2, "forward")
    torch._dynamo.reset()


def test_check_mode_is_checked(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="check_mode must be one of"):
        watch(model, tmp_path / "run", check_mode="sometimes")
    with pytest.raises(ConfigTypeError, match="check_mode"):
        watch(model, tmp_path / "run", check_mode=1)


def test_outputs_too_big_to_hold_are_reduced_at_once(tmp_path, monkeypatch):
    """An output above HOLD_OUTPUT_BYTES (an LLM's logits) is reduced at the end of the forward
    and only its norm kept: the sentinel still sees its NaN, the replay still names the origin."""
    from introspect.probes.nonfinite import sentinel

    monkeypatch.setattr(sentinel, "HOLD_OUTPUT_BYTES", 0)
    torch.manual_seed(0)
    model = mlp(Fault({2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with watch(model, tmp_path / "run", every=10**9, **QUIET) as w:
            for step in range(3):
                set_step(model, step)
                out = model(torch.randn(6, 4))
                if step < 2:
                    out.pow(2).mean().backward()
            # Step 2 is forward only, read when the watch ends: its output's norm is all the
            # sentinel has.
    assert [(a.where, a.step) for a in w.alerts if a.kind == "nonfinite"] == [("fault", 2)]


def test_packed_norms_square_their_own_copy_never_a_gradient():
    """The per-step read squares the flat copy in place (numpy), over the layout known at bind
    (or worked out from the gradients):
    each gradient's own norm, large ones (reduced where they are) in their places too, a NaN or
    Inf in its own parameter only, bfloat16 gradients read in float32, and the gradients
    themselves unchanged; one gradient alone (``flatten_dense`` then gives a view of it) is copied
    before it is squared."""
    from introspect.probes.nonfinite.norms import PACK_LIMIT, FlatLayout, packed_norms

    torch.manual_seed(0)
    for shapes in ([(32, 32), (32,), (7,), (3, 5)], [(PACK_LIMIT + 1,), (32, 32), (2, PACK_LIMIT), (7,), (3, 5)]):
        layout = FlatLayout.of([torch.empty(s) for s in shapes])
        assert layout is not None and len(layout.big_at) == sum(int(np.prod(s)) > PACK_LIMIT for s in shapes)
        for _ in range(3):
            grads = [torch.randn(s) for s in shapes]
            before = [g.clone() for g in grads]
            want = torch.stack([g.norm() for g in grads])
            assert torch.allclose(packed_norms(grads, layout=layout), want, rtol=1e-5)
            assert torch.allclose(packed_norms(grads), want, rtol=1e-5)  # (no layout: the general path)
            assert all(torch.equal(g, b) for g, b in zip(grads, before))
        small, large = layout.small_at[1], (layout.big_at or layout.small_at)[0]
        grads[small].view(-1)[3], grads[large].view(-1)[1] = float("nan"), float("inf")
        got = packed_norms(grads, layout=layout)
        clean = [i for i in range(len(grads)) if i not in (small, large)]
        assert torch.isfinite(got[clean]).all() and got[small].isnan() and got[large].isinf()
        half = [torch.randn(s).bfloat16() for s in shapes]
        want = torch.stack([g.float().norm() for g in half])
        assert torch.allclose(packed_norms(half, layout=FlatLayout.of(half)), want, rtol=1e-5)
    one = torch.randn(6)
    kept = one.clone()
    assert torch.allclose(packed_norms([one], layout=FlatLayout.of([one])), kept.norm().reshape(1))
    assert torch.equal(one, kept)
    assert FlatLayout.of([torch.empty(0), torch.empty(3)]) is None  # an empty one: no fixed layout
    # Without a layout it is worked out from the gradients: mixed dtypes (the copy promotes them),
    # and an empty gradient (no layout: one norm per tensor).
    mixed = [torch.randn(4, 4), torch.randn(9).bfloat16(), torch.randn(3).double()]
    want = torch.stack([g.double().norm().float() for g in mixed])
    assert torch.allclose(packed_norms(mixed), want, rtol=1e-5)
    with_empty = [torch.randn(5), torch.empty(0), torch.randn(2, 2)]
    want = torch.stack([g.norm() for g in with_empty])
    assert torch.allclose(packed_norms(with_empty), want, rtol=1e-5)

"""Faster detection: a cheap every-step signal makes the next steps logging steps (escalation),
so the per-module and attention views see a fault at once even at every=50; detectors judge each
module against its own past; a layer that dies is named at the step it died; a NaN step off the
cadence still gets its column on the health map."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from introspect import watch
from introspect.analysis.health_map_render import health_map_from_events
from introspect.errors import NonFiniteWarning
from tests.support import QUIET
from tests.support.events import hist_steps, read_events, scalar_at

ESCALATE = 3  # Thresholds.escalate_steps' default


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(
        block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    )


def train(model, logdir, steps, *, make_input, on_step=None, loss_scale=None, **options):  # type: ignore[no-untyped-def]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with watch(model, logdir, optimizer=opt, **QUIET, **options) as w:
        for step in range(steps):
            if on_step is not None:
                on_step(step, model)
            x, y = make_input(g), torch.randint(0, 10, (16,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            if loss_scale is not None:
                loss = loss * loss_scale(step)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return w


def vectors(g: torch.Generator) -> torch.Tensor:
    return torch.randn(16, 20, generator=g)


def images(g: torch.Generator) -> torch.Tensor:
    return torch.randn(16, 3, 12, 12, generator=g)


def test_a_gradient_spike_makes_the_next_steps_logging_steps(tmp_path):
    """every=50, a x1000 loss at step 30: the spike score fires at 30, and steps 31-33 are in the
    event file (histograms, read back), then the cadence goes on as before. The per-parameter
    jump is switched off here, so the spike score alone escalates."""
    fault = 30
    w = train(
        mlp(),
        tmp_path,
        40,
        make_input=vectors,
        loss_scale=lambda step: 1000.0 if step == fault else 1.0,
        every=50,
        thresholds={"param_grad_jump": 1e12},
    )
    spikes = [a for a in w.alerts if a.kind == "grad_norm_spike"]
    assert [a.step for a in spikes] == [fault]
    acc = read_events(tmp_path)
    assert hist_steps(acc, "grads/0.weight") == [0, fault + 1, fault + 2, fault + 3]
    assert hist_steps(acc, "activations/1") == [0, fault + 1, fault + 2, fault + 3]


def test_escalation_can_be_turned_off(tmp_path):
    fault = 30
    train(
        mlp(),
        tmp_path,
        40,
        make_input=vectors,
        loss_scale=lambda step: 1000.0 if step == fault else 1.0,
        every=50,
        thresholds={"escalate_steps": 0},
    )
    assert hist_steps(read_events(tmp_path), "grads/0.weight") == [0]


def test_a_dead_layer_is_named_at_once_at_the_default_cadence(tmp_path):
    """A BatchNorm's bias at -100 at step 20 (a dead ReLU layer): its parameters' gradients drop
    to exactly 0, which escalates; the next step's dead units are measured against each unit's
    active rate so far and the layer is named at step 21, not after a 64-sample window."""
    fault = 20

    def kill(step: int, model: nn.Module) -> None:
        if step == fault:
            with torch.no_grad():
                model[0][1].bias.fill_(-100.0)

    w = train(cnn(), tmp_path, fault + 3, make_input=images, on_step=kill)
    dead = [a for a in w.alerts if a.kind == "dead_units" and a.where == "0.2"]
    assert dead and fault < dead[0].step <= fault + 2, w.alerts
    assert dead[0].numbers["dead_fraction"] == 1.0
    assert all(a.step > fault for a in w.alerts), w.alerts  # nothing before the fault


@pytest.mark.parametrize("model, make_input, steps", [(mlp, vectors, 150), (cnn, images, 100)])
def test_healthy_sparse_relus_are_never_dead(tmp_path, model, make_input, steps):
    """Every step a logging step: every ReLU judged against its own active rate, every layer's
    statistics against their own past, the escalation armed: no finding, no escalation."""
    m = model()
    w = train(m, tmp_path, steps, make_input=make_input, every=1)
    assert w.alerts == []
    sentinel = next(p for p in w._probes if type(p).__name__ == "NonFiniteSentinel")
    assert sentinel.escalations == 0
    # The ReLUs are sparse (most outputs zero), not dead: the test is not vacuous.
    acc = read_events(tmp_path)
    relu = "activations/1" if model is mlp else "activations/2.2"
    histogram = acc.Histograms(relu)[-1].histogram_value
    assert histogram.min == 0.0 and histogram.max > 0


def test_the_nan_step_is_on_the_health_map(tmp_path):
    """every=50, a NaN made by one layer at step 7: the step is no logging step, yet the replay's
    per-module counts are written at it (nonfinite/{module}), so the map has that column with
    the NaN where it began; the forced steps after it have every layer NaN."""
    fault = 7

    class Blowup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fire = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 0.0 * 0.0 if self.fire else x

    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), Blowup(), nn.Linear(32, 10))

    def arm(step: int, m: nn.Module) -> None:
        m[2].fire = step == fault

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        w = train(model, tmp_path, fault + 2, make_input=vectors, on_step=arm, every=50)
    origin = next(a for a in w.alerts if a.kind == "nonfinite")
    assert (origin.where, origin.step) == ("2", fault)
    acc = read_events(tmp_path)
    assert scalar_at(acc, "nonfinite/2", fault) >= 16 * 32
    hm = health_map_from_events(tmp_path)
    column = hm.steps.index(fault)
    counts = hm.matrix("nonfinite")[:, column]
    assert counts[hm.rows.index("2")] >= 16 * 32
    assert hm.steps[:2] == [0, fault]


def test_a_qk_fault_is_named_at_its_attention_module_within_two_steps_at_every_50(tmp_path):
    """A tiny Llama (random weights, initialiser 0.02: fresh attention logits ~0.1) with one
    layer's q_proj and k_proj scaled x30 at step 102, every=50. Its logits reach ~70 (below the
    absolute 100) and its entropy stays above the 0.1-nat floor in raw nats: only its own past
    says it collapsed. The q/k gradient norms jump, which escalates; the next step's attention
    view names the module."""
    pytest.importorskip("transformers")
    from tests.support.hf_models import tiny_decoder

    model = tiny_decoder("llama")
    fault = 102
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with watch(model, tmp_path, every=50, optimizer=opt, **QUIET) as w:
        for step in range(fault + 3):
            if step == fault:
                with torch.no_grad():
                    model.model.layers[1].self_attn.q_proj.weight.mul_(30)
                    model.model.layers[1].self_attn.k_proj.weight.mul_(30)
            ids = torch.randint(0, 64, (2, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(a.step > fault for a in w.alerts), w.alerts
    attention = [a for a in w.alerts if a.kind.startswith("attention_") and a.where == "model.layers.1.self_attn"]
    assert attention and attention[0].step <= fault + 2, w.alerts
    assert max(a.numbers.get("max_logit", 0.0) for a in attention) < 100  # the absolute ceiling alone: silent
    assert not [a for a in w.alerts if a.kind.startswith("attention_") and "layers.0" in a.where]
    # The event file has the attention view right after the fault, off the every=50 cadence.
    steps = [e.step for e in read_events(tmp_path).Scalars("attention/entropy/model.layers.1.self_attn")]
    assert steps[:3] == [0, 50, 100] and fault + 1 in steps


def test_a_fused_qkv_fault_is_named_at_its_attention_module_within_two_steps_at_every_50(tmp_path):
    """The GPT-2 form of the q/k fault: q, k and v are one Conv1D (``c_attn``), and scaling its q
    and k columns x30 at step 102 moves that parameter's whole gradient norm < 1.2x (the value
    part, ~40x larger, hides it). The sentinel reads the norm of the q/k part of the fused
    gradient too; it moves ~10x on the fault step and the next, a lasting jump that escalates at
    103; the attention view of step 104 names the module. Nothing is said before the fault."""
    pytest.importorskip("transformers")
    from tests.support.hf_models import VOCAB, tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2()
    fault = 102
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with watch(model, tmp_path, every=50, optimizer=opt, **QUIET) as w:
        sentinel = next(p for p in w._probes if type(p).__name__ == "NonFiniteSentinel")
        assert sentinel._jumps.slice_names == (
            "transformer.h.0.attn.c_attn.weight[qk]",
            "transformer.h.1.attn.c_attn.weight[qk]",
        )
        for step in range(fault + 3):
            if step == fault:
                with torch.no_grad():
                    attn = model.transformer.h[1].attn
                    n = attn.c_attn.weight.shape[1] // 3
                    attn.c_attn.weight[:, : 2 * n].mul_(30)
                    attn.c_attn.bias[: 2 * n].mul_(30)
            ids = torch.randint(0, VOCAB, (2, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(a.step > fault for a in w.alerts), w.alerts
    attention = [a for a in w.alerts if a.kind.startswith("attention_") and a.where == "transformer.h.1.attn"]
    assert attention and attention[0].step <= fault + 2, w.alerts
    assert not [a for a in w.alerts if a.kind.startswith("attention_") and ".h.0." in a.where]
    assert sentinel.escalations == 1
    steps = [e.step for e in read_events(tmp_path).Scalars("attention/entropy/transformer.h.1.attn")]
    assert steps[:3] == [0, 50, 100] and fault + 2 in steps


def test_the_fused_qk_slices_are_the_query_and_key_part_of_the_gradient():
    """GPT-2's Conv1D ``c_attn`` ([E, 3E], columns q | k | v) and ``nn.MultiheadAttention``'s
    ``in_proj_weight`` ([3E, E], rows q | k | v): the slice is the q and k part, nothing else."""
    pytest.importorskip("transformers")
    from introspect.probes.nonfinite.sentinel import fused_qk_slices
    from tests.support.hf_models import tiny_gpt2

    gpt2 = tiny_gpt2()
    names = [n for n, _ in gpt2.named_parameters()]
    slices = fused_qk_slices(gpt2, names)
    assert [(n, names[i]) for n, i, _ in slices] == [
        (f"transformer.h.{k}.attn.c_attn.weight[qk]", f"transformer.h.{k}.attn.c_attn.weight") for k in (0, 1)
    ]
    grad = torch.randn(32, 96)
    want = torch.cat([grad[:, :32], grad[:, 32:64]], dim=1).norm()
    assert torch.allclose(slices[0][2](grad).norm(), want)
    grad[3, 40] = float("nan")  # (in k: the slice says so)
    assert slices[0][2](grad).norm().isnan()
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    names = [n for n, _ in mha.named_parameters()]
    ((name, index, view),) = fused_qk_slices(mha, names)
    assert name == "1.in_proj_weight[qk]" and names[index] == "1.in_proj_weight"
    grad = torch.randn(24, 8)
    assert torch.equal(view(grad), grad[:16])


# ----------------------------------------------------------------------- the escalations' budget
def spikes_at(*steps: int):  # type: ignore[no-untyped-def]
    return lambda step: 1000.0 if step in steps else 1.0


def test_a_model_that_keeps_escalating_gets_the_budgets_escalations_only(tmp_path):
    """Loss spikes x1000 at steps 20, 35 and 42 (each fires the spike score and parameter jumps;
    after the second the model keeps jumping). With no time to spend (escalate_share=0) the first
    two escalations are still granted at once (one of slack: a false alarm must not cost the real
    fault after it); the later ones are refused, counted, and the report says so. Without a
    limit (1) every one logs."""

    def spiky(logdir, share: float):  # type: ignore[no-untyped-def]
        thresholds = {"escalate_share": share}
        return train(
            mlp(), logdir, 45, make_input=vectors, loss_scale=spikes_at(20, 35, 42), every=100, thresholds=thresholds
        )

    limited = spiky(tmp_path / "limited", 0)
    assert hist_steps(read_events(tmp_path / "limited"), "grads/0.weight") == [0, 21, 22, 23, 36, 37, 38]
    clock = limited.ctx.clock
    assert clock.escalations == 2 and clock.escalations_skipped >= 1  # type: ignore[attr-defined]
    assert f"{clock.escalations_skipped} escalations skipped (budget)" in limited.report()  # type: ignore[attr-defined]
    assert [a.step for a in limited.alerts if a.kind == "grad_norm_spike"] == [20]

    free = spiky(tmp_path / "free", 1)
    steps = hist_steps(read_events(tmp_path / "free"), "grads/0.weight")
    assert steps[:7] == [0, 21, 22, 23, 36, 37, 38] and 43 in steps
    assert free.ctx.clock.escalations_skipped == 0  # type: ignore[attr-defined]
    assert "escalations skipped" not in free.report()


def test_a_nan_forces_its_logging_steps_whatever_the_budget(tmp_path):
    """Spikes at steps 20 and 25 spend the budget (share 0: nothing is ever earned back; their
    escalations are granted, the model's jumps after them refused); a NaN output at step 30 still
    makes the next steps logging steps: a non-finite step is worth them."""
    nan_step = 30

    def poison(step: int, model: nn.Module) -> None:
        if step == nan_step:
            model[2].register_forward_hook(lambda m, i, o: o * float("nan"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        w = train(
            mlp(),
            tmp_path,
            nan_step + 3,
            make_input=vectors,
            loss_scale=spikes_at(20, 25),
            on_step=poison,
            every=100,
            thresholds={"escalate_share": 0},
        )
    clock = w.ctx.clock
    assert clock.escalations == 2 and clock.escalations_skipped >= 1  # type: ignore[attr-defined]
    assert [a.step for a in w.alerts if a.kind == "nonfinite"][:1] == [nan_step]
    logged = [e.step for e in read_events(tmp_path).Scalars("grad_norm/0.weight")]
    assert logged[:4] == [0, 21, 22, 23] and [s for s in logged if s >= nan_step] == [nan_step + 1, nan_step + 2]


class _Time:
    """A clock the test moves by hand (the budget measures step times with it)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_an_escalation_is_earned_back_at_the_share_of_the_run_time():
    """Steps of 10 ms, an escalation's logging steps of 60 ms (50 ms over the median step): the
    first two escalations are granted at once and charged 3 x 50 ms each; at a 10% share the
    third is granted once the first's 0.15 s is earned back, when the run has lasted 1.5 s."""
    from introspect.live.clock import StepClock

    now = _Time()
    clock = StepClock(
        every=1000,
        check_every=1,
        image_every=1000,
        writes=True,
        counts_optimizer_steps=False,
        step_fn=None,
        escalate_share=0.1,
        now=now,
    )
    logged = []

    def step() -> None:
        plan = clock.plan()
        logged.append(plan.logging)
        now.t += 0.06 if plan.logging else 0.01

    for _ in range(20):
        step()
    for granted in (1, 2):
        assert clock.request_log(3, budgeted=True) and clock.escalations == granted  # at once
        for _ in range(4):
            step()
        assert logged[-4:] == [True, True, True, False]
    assert clock.budget.spent == pytest.approx(0.3)
    assert not clock.request_log(3, budgeted=True) and clock.escalations_skipped == 1
    while now.t < 1.5 - 1e-9:
        assert not clock.request_log(3, budgeted=True)
        step()
    assert clock.request_log(3, budgeted=True) and clock.escalations == 3
    assert clock.request_log(1) and clock.escalated == 3  # (unbudgeted: a NaN's, never refused)

"""Each module against its own past: the rolling median/MAD baseline and the per-parameter
gradient-norm history, numbers in, verdicts out."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from introspect import Thresholds
from introspect.debugger.baselines import Baselines, ParamNormJumps, judge_module_shifts


def baselines(**kw) -> Baselines:  # type: ignore[no-untyped-def]
    return Baselines.of(Thresholds(**kw))


def test_no_verdict_before_the_warm_up():
    b = baselines()
    assert b.judge("entropy", "attn", 0.9, "down") is None
    assert b.judge("entropy", "attn", 0.9, "down") is None
    # Two values known, three needed: a 100x fall is still no verdict.
    assert b.judge("entropy", "attn", 0.009, "down") is None
    assert b.history("entropy", "attn") == [0.9, 0.9, 0.009]


def test_a_fall_of_many_deviations_and_a_large_factor_is_a_shift():
    b = baselines()
    for v in (0.91, 0.9, 0.92, 0.89):
        assert b.judge("entropy", "attn", v, "down") is None
    shift = b.judge("entropy", "attn", 0.05, "down")
    assert shift is not None
    assert shift.median == pytest.approx(0.905) and shift.factor == pytest.approx(0.905 / 0.05)
    assert shift.deviations > 8 and shift.history == 4
    # Another module's history is its own.
    assert b.judge("entropy", "other", 0.05, "down") is None


def test_the_factor_floor_holds_on_a_quiet_history():
    """A history of near-identical values has a tiny MAD: a 2x move is hundreds of deviations,
    and still no shift below the factor (4)."""
    b = baselines()
    for _ in range(5):
        b.judge("max_logit", "attn", 1.0, "up")
    assert b.judge("max_logit", "attn", 2.0, "up") is None
    assert b.judge("max_logit", "attn", 3.9, "up") is None
    assert b.judge("max_logit", "attn", 40.0, "up") is not None


def test_a_noisy_history_needs_more_than_the_factor():
    """A statistic that already swings 10x from step to step is not shifted by one more 5x swing."""
    b = baselines()
    for v in (1.0, 10.0, 0.5, 8.0, 1.5, 12.0):
        b.judge("grad_rms", "fc", v, "up")
    assert b.judge("grad_rms", "fc", 5 * 4.75, "up") is None  # 5x the median 4.75, a few deviations


def test_non_finite_values_are_not_measured():
    b = baselines()
    for v in (1.0, 1.0, 1.0):
        b.judge("entropy", "attn", v, "down")
    assert b.judge("entropy", "attn", math.nan, "down") is None
    assert b.judge("entropy", "attn", -math.inf, "down") is None
    assert b.history("entropy", "attn") == [1.0, 1.0, 1.0]  # and not learnt


def test_the_window_rolls():
    b = baselines(baseline_window=3)
    for v in (1.0, 1.0, 1.0, 100.0, 100.0, 100.0):
        b.judge("activation_rms", "fc", v, "up")
    assert b.history("activation_rms", "fc") == [100.0, 100.0, 100.0]
    assert b.judge("activation_rms", "fc", 110.0, "up") is None  # the new level is the baseline now


def test_module_shifts_name_the_layer_and_the_kind():
    b = baselines()
    for step in range(5):
        assert judge_module_shifts(b, step, {"fc1": 1e-2, "fc2": 1e-2}, {"fc1": 1.0}, {"fc1.weight": 1e-3}) == []
    alerts = judge_module_shifts(b, 5, {"fc1": 1.0, "fc2": 1e-5}, {"fc1": 50.0}, {"fc1.weight": 1.0})
    kinds = {(a.kind, a.where) for a in alerts}
    # Gradients are not judged by the factor (healthy ones swing 4-6x): exploding_jump's.
    assert kinds == {("activation_shift", "fc1"), ("update_ratio_shift", "fc1.weight")}
    assert b.history("grad_rms", "fc1")[-1] == 1.0  # kept all the same
    assert all(a.step == 5 and a.numbers["factor"] >= 4 for a in alerts)


def test_an_update_ratio_needs_its_own_larger_factor():
    """A hard batch moves Adam's update ratios ~4x (a healthy CNN at every=1: 4.1-4.3x); a learning
    rate that jumped moves them 10-1000x. Update ratios rise ``update_ratio_factor``, not the 4x."""
    factor = Thresholds().update_ratio_factor
    assert factor == 10
    for ratio, shifted in ((4.3e-3, False), (2e-2, True)):
        b = baselines()
        for step in range(5):
            judge_module_shifts(b, step, {}, {}, {"fc.weight": 1e-3 * (1 + 0.01 * step)}, 0.0, factor)
        alerts = judge_module_shifts(b, 5, {}, {}, {"fc.weight": ratio}, 0.0, factor)
        assert [a.kind for a in alerts] == (["update_ratio_shift"] if shifted else []), ratio


def test_shifts_that_move_together_are_one_finding():
    """A learning-rate jump moves every parameter's update ratio, and every layer after a bad one
    shifts its output: one finding per statistic and step, at the first, counting the others."""
    b = baselines()
    layers = ["fc1", "fc2", "fc3"]
    params = [f"{m}.weight" for m in layers]
    for step in range(4):
        judge_module_shifts(b, step, {}, dict.fromkeys(layers, 1.0), dict.fromkeys(params, 1e-3))
    alerts = judge_module_shifts(b, 4, {}, {"fc1": 1.0, "fc2": 30.0, "fc3": 40.0}, dict.fromkeys(params, 1.0))
    assert [(a.kind, a.where, a.numbers["others"]) for a in alerts] == [
        ("activation_shift", "fc2", 1.0),
        ("update_ratio_shift", "fc1.weight", 2.0),
    ]
    assert "learning-rate" in alerts[1].message


def test_healthy_drifting_statistics_are_no_shift():
    """Slow trends and step-to-step noise over many steps, like a healthy run's: no shift."""
    rng = random.Random(0)
    b = baselines()
    for step in range(300):
        trend = math.exp(-step / 100)  # gradients shrinking as the loss falls
        found = judge_module_shifts(
            b,
            step,
            {"fc": 1e-2 * trend * rng.lognormvariate(0, 0.3)},
            {"fc": 1.0 + 0.01 * step + rng.gauss(0, 0.05)},
            {"fc.weight": 1e-3 * rng.lognormvariate(0, 0.3)},
        )
        assert found == [], (step, found)


# --------------------------------------------------------------------------- per-parameter norms
def test_one_parameters_jump_hidden_in_the_global_norm():
    """q/k scaled x30: its own norm moves ~8x while the global norm, dominated by others, barely does."""
    rng = np.random.default_rng(0)
    names = tuple(f"p{i}" for i in range(50))
    base = rng.uniform(0.5, 2.0, 50)
    jumps = ParamNormJumps(factor=5.0, sigmas=6.0, min_history=10)
    for _ in range(30):
        assert jumps.update(names, base * rng.lognormal(0, 0.05, 50)) is None
    norms = base * rng.lognormal(0, 0.05, 50)
    global_before = math.sqrt(float((norms**2).sum()))
    norms[7] *= 8
    assert math.sqrt(float((norms**2).sum())) < 2 * global_before
    found = jumps.update(names, norms)
    assert found is not None and found[0] == "p7" and found[1] == pytest.approx(8, rel=0.3)


def test_a_gradient_that_becomes_zero_is_a_fall_once():
    names = ("a", "b")
    jumps = ParamNormJumps(factor=5.0, sigmas=6.0, min_history=3)
    for _ in range(5):
        jumps.update(names, [1.0, 1.0])
    assert jumps.update(names, [0.0, 1.0]) == ("a", 0.0)
    assert jumps.update(names, [0.0, 1.0]) is None  # dead still: said already
    jumps.update(names, [1.0, 1.0])
    assert jumps.update(names, [0.0, 1.0]) is None  # intermittent (an unrouted expert): no news


def test_no_jump_before_the_history_and_rises_only():
    jumps = ParamNormJumps(factor=3.0, sigmas=6.0, min_history=5, rises_only=True)
    for _ in range(4):
        jumps.update(("loss",), [2.0])
    assert jumps.update(("loss",), [100.0]) is None  # 4 steps known, 5 needed
    for _ in range(10):
        jumps.update(("loss",), [2.0])
    assert jumps.update(("loss",), [0.01]) is None  # a falling loss is good news
    assert jumps.update(("loss",), [30.0]) is not None
    assert jumps.update(("loss",), [30.0]) is None  # the new level is its history now: said once


def test_a_lasting_jump_clears_a_lower_bar_twice_and_a_single_spike_does_not():
    """A noisy norm (σ of its log ~0.5): a x8 move is ~4σ, below the 6σ bar. Once, it is noise;
    twice in a row against the history before it (a fault that stays), it is a jump, said on the
    second step and then not again (the history starts over at the new level)."""
    rng = np.random.default_rng(1)
    names = ("noisy", "calm")

    def fresh() -> ParamNormJumps:
        jumps = ParamNormJumps(5.0, 6.0, 10, confirm_sigmas=3.0, confirm_history=50)
        for _ in range(80):
            assert jumps.update(names, [float(rng.lognormal(0, 0.5)), 1.0]) is None
        return jumps

    jumps = fresh()
    assert jumps.update(names, [8.0, 1.0]) is None  # the first step of it: not yet
    found = jumps.update(names, [8.0, 1.0])
    assert found is not None and found[0] == "noisy" and found[1] == pytest.approx(8, rel=0.5)
    assert jumps.update(names, [8.0, 1.0]) is None  # its new level now
    jumps = fresh()
    assert jumps.update(names, [8.0, 1.0]) is None
    assert jumps.update(names, [1.0, 1.0]) is None  # back at once: a spike
    # Before confirm_history steps the lasting rule does not judge (a fresh model's own course).
    early = ParamNormJumps(5.0, 6.0, 10, confirm_sigmas=3.0, confirm_history=50)
    for _ in range(20):
        early.update(names, [float(rng.lognormal(0, 0.5)), 1.0])
    assert [early.update(names, [8.0, 1.0]) for _ in range(2)] == [None, None]


def test_confirm_only_names_and_small_gradients_falls():
    """A fused q/k slice is judged by the lasting rule alone: a x100 single step says nothing. A
    one-value gradient (a one-output classifier's bias: one signed mean) is not judged on falls,
    but its rises and an exact 0 still are."""
    names = ("w", "w[qk]", "bias")
    jumps = ParamNormJumps(
        5.0, 6.0, 10, confirm_sigmas=3.0, confirm_history=20, confirm_only=frozenset({"w[qk]"}), sizes={"bias": 1}
    )
    for _ in range(30):
        jumps.update(names, [1.0, 1.0, 1.0])
    assert jumps.update(names, [1.0, 100.0, 1.0]) is None
    assert jumps.update(names, [1.0, 1.0, 1.0]) is None
    assert [jumps.update(names, [1.0, 1.0, 1e-3]) for _ in range(3)] == [None] * 3
    for _ in range(30):
        jumps.update(names, [1.0, 1.0, 1.0])
    assert jumps.update(names, [1.0, 100.0, 1.0]) is None
    assert jumps.update(names, [1.0, 100.0, 1.0]) == ("w[qk]", pytest.approx(100, rel=0.1))
    for _ in range(30):
        jumps.update(names, [1.0, 100.0, 1.0])
    assert jumps.update(names, [1.0, 100.0, 100.0]) == ("bias", pytest.approx(100, rel=0.1))
    for _ in range(30):
        jumps.update(names, [1.0, 100.0, 1.0])
    assert jumps.update(names, [1.0, 100.0, 0.0]) == ("bias", 0.0)


def test_a_new_set_of_parameters_starts_a_new_history():
    jumps = ParamNormJumps(factor=5.0, sigmas=6.0, min_history=3)
    for _ in range(5):
        jumps.update(("a", "b"), [1.0, 1.0])
    assert jumps.update(("a",), [100.0]) is None  # another set: no history for it yet


def test_escalation_thresholds_are_settable_and_checked():
    t = Thresholds.coerce({"escalate_steps": 5, "baseline_factor": 8})
    assert t.escalate_steps == 5 and t.baseline_factor == 8
    with pytest.raises(ValueError):
        Thresholds.coerce({"escalate_steps": -1})


def test_a_steady_growth_is_the_modules_course_not_an_activation_shift():
    """The tiny Llama's healthy layer-0 down_proj output RMS at steps 0/50/100/150/200 (every=50):
    6.2x its median at step 200, 2.8x where its own log-linear trend leads. A jump or a fall
    from a flat past is still one."""
    from introspect.debugger.baselines import shift_of, trend_ratio

    past = [0.00285, 0.00409, 0.00524, 0.00753]
    assert shift_of(0.02885, past, "up", 3, 8.0, 4.0) is not None  # the median alone: a shift
    assert 2.5 < trend_ratio(0.02885, past) < 3.0
    assert shift_of(0.02885, past, "up", 3, 8.0, 4.0, trend=True) is None
    flat = [1.0, 1.02, 0.98, 1.01]
    assert shift_of(10.0, flat, "up", 3, 8.0, 4.0, trend=True) is not None
    assert shift_of(1e-6, flat, "down", 3, 8.0, 4.0, trend=True) is not None


@pytest.mark.parametrize("confirm", [0.0, 3.0])
def test_the_quiet_path_decides_and_moves_the_history_as_the_full_pass_does(confirm):
    """The every-step path (``_quiet_step``) is a shortcut of the full pass, also with dead
    parameters (norm 0 on every step, half of a deep ReLU stack's) and parameters whose norm is
    sometimes 0: the same jumps on the same steps, and the same histories after, as a detector
    that always takes the full pass (whose counts it keeps up to ``confirm_history``)."""
    rng = np.random.default_rng(0)
    n = 40
    names = tuple(f"p{i}" for i in range(n))
    kwargs = dict(confirm_sigmas=confirm, confirm_history=30, confirm_only=frozenset({"p3"}))
    fast, full = ParamNormJumps(5.0, 6.0, 10, **kwargs), ParamNormJumps(5.0, 6.0, 10, **kwargs)
    full._quiet_step = lambda x: False  # type: ignore[method-assign]
    dead = rng.random(n) < 0.4
    level = rng.uniform(0.1, 10.0, n)
    quiet = 0
    for step in range(400):
        x = level * np.exp(rng.normal(0.0, 0.1, n))
        x[dead] = 0.0
        x[5] = 0.0 if step % 7 == 0 else x[5]  # intermittent
        if step in (120, 121, 122):  # a lasting jump of one parameter
            x[8] *= 40.0
        if step == 200:  # a dead one comes alive
            x[int(np.flatnonzero(dead)[0])] = 1.0
        if step == 300:
            x[9] = 0.0  # a first fall to 0
        if step == 350:
            x[10] = float("nan")
        quiet += fast._threshold is not None
        assert fast.update(names, x.tolist()) == full.update(names, x.tolist()), step
        assert np.allclose(fast._mean, full._mean) and np.allclose(fast._var, full._var)
        # (counts matter up to confirm_history: past it the shortcut stops counting)
        cap = fast.confirm_history if confirm else fast.min_history
        assert (np.minimum(fast._count, cap) == np.minimum(full._count, cap)).all()
        assert (fast._zero_seen == full._zero_seen).all()
        assert (fast._pending == full._pending).all()
    assert quiet > 300  # the shortcut was taken

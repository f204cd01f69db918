"""Unit and gradient health from a step's numbers: dead and saturated units, vanishing, exploding and
stuck gradients, and the thresholds (``Thresholds``) each verdict uses."""

from __future__ import annotations

import bisect
import math
import numbers
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, ConfigTypeError
from .alerts import Alert

__all__ = ["Thresholds", "check_activation_health", "GradientHealth"]


@dataclass(frozen=True)
class Thresholds:
    """When a number becomes a finding. Pass ``watch(..., thresholds={"dead_fraction": 0.9})``."""

    dead_fraction: float = 0.5
    """A ReLU-family module is reported when at least this share of its units (channels for conv
    maps) is zero for every sample seen over consecutive logging steps..."""
    dead_min_samples: float = 64
    """...once those steps hold at least this many samples in all."""
    saturated_fraction: float = 0.5
    """A Sigmoid/Tanh module is reported when this share of its outputs sits at its bounds."""
    saturation_margin: float = 1e-3
    """How close to 0/1 (sigmoid) or -1/1 (tanh) counts as "at the bound"."""
    vanishing_ratio: float = 1e-4
    """A layer whose RMS gradient is this many times smaller than the median layer's."""
    vanishing_floor: float = 1e-12
    """...or whose RMS gradient is below this, whatever the others do."""
    exploding_norm: float = 1e6
    """A layer whose gradient norm exceeds this."""
    exploding_jump: float = 100.0
    """...or grows this many times above its median over the last (up to 5, at least 3) logging
    steps."""
    stuck_ratio: float = 1e-10
    """With ``optimizer=``: a parameter whose update/weight ratio stays below this is not learning."""
    # Transformers (see introspect.probes.transformer and introspect.probes.grad_spike).
    attention_entropy_floor: float = 0.1
    """An attention module whose softmax entropy (nats, mean over its heads and sampled query
    rows) falls below this has collapsed to one-hot attention (Zhai et al. 2023, "Stabilizing
    transformer training by preventing attention entropy collapse": collapsed runs sit near 0)."""
    attention_max_logit: float = 100.0
    """An attention module whose largest logit q·kᵀ·scale exceeds this shows attention logit
    growth (Dehghani et al. 2023, ViT-22B; Wortsman et al. 2023, "Small-scale proxies for
    large-scale Transformer training instabilities": stable runs stay in the tens, diverging ones
    grow into the thousands)."""
    massive_activation_abs: float = 100.0
    """A block output (the residual stream) holding a value above this in magnitude..."""
    massive_activation_ratio: float = 1000.0
    """...and this many times its median |x| has a massive activation (Sun et al. 2024,
    "Massive activations in large language models")."""
    logit_log_z_drift: float = 50.0
    """Output logits whose log Z = logsumexp (mean over positions) is further than this from
    log(vocabulary size), the value of uniform logits, or whose std over positions exceeds it,
    diverge (Wortsman et al. 2023; PaLM's z-loss exists to keep log Z near 0)."""
    grad_spike_sigma: float = 7.0
    """A global gradient norm this many standard deviations above its rolling mean is a spike
    (OLMo 2's spike score, Team OLMo 2024)..."""
    grad_spike_ratio: float = 2.0
    """...and at least this many times the mean (a window of near-equal norms has a tiny σ)."""
    grad_spike_window: float = 100
    """How many earlier checked steps the rolling mean and σ are taken over..."""
    grad_spike_min_history: float = 10
    """...once at least this many are known."""
    init_gain_max: float = 10.0
    """At the first logging step, a Linear/Conv layer whose gain RMS(W) x √fan_in is above this
    (common initialisations give 0.3-7: EfficientNet-B0's squeeze-excitation fc1 under kaiming fan_out is 7.2) is an exploding initialisation."""
    init_rms_min: float = 1.5
    """...and whose weights' RMS is above this: every common initialisation keeps it below ~1.41
    (kaiming fan_out on one output; PyTorch's default at most 0.58), while a small layer's own
    init may amplify by more than ten (torchvision's EfficientNet head, uniform ±1/√classes:
    RMS 0.58 and a gain of 21 for one class)."""
    grad_spike_recent: float = 20
    """The spike must also be ``grad_spike_sigma`` deviations above the last this many checked
    steps alone (0: off): a gradient norm that grew during training is judged against its recent
    level too, not only against a mean the early steps hold down (one hard batch of a small CNN
    at 4.9x the 100-step mean is 8σ above it, 5σ above its last 20 steps)."""
    # Mixture-of-experts (see introspect.probes.moe).
    moe_collapse_ratio: float = 0.5
    """An MoE block whose effective number of experts (exp of the entropy of its routed load)
    falls below this share of its value at the run's start (its first logging steps) has
    collapsed onto a few experts (Shazeer et al. 2017; Fedus et al. 2022, Switch Transformers)."""
    moe_router_logit_growth: float = 10.0
    """A router whose largest logit grows this many times above its value at the run's start..."""
    moe_router_max_logit: float = 10.0
    """...and above this shows router logit growth: the softmax saturates and routing turns
    brittle (Zoph et al. 2022, ST-MoE, whose router z-loss keeps the logits small)."""
    # Each module against its own past (see introspect.debugger.baselines).
    baseline_window: float = 8
    """How many of a module's latest logging steps its baseline (median and MAD) is taken over..."""
    baseline_min_history: float = 3
    """...once at least this many are known (before that only the absolute thresholds judge)."""
    baseline_deviations: float = 8.0
    """A statistic this many robust deviations (1.4826 x MAD, at least 1% of the median) from
    its module's median..."""
    baseline_factor: float = 4.0
    """...and at least this many times above or below it is a sudden change: normalised
    attention entropy (H / log of the keys attended) falling, attention max logit rising
    (above ``attention_logit_jump_floor``), activation RMS, gradient RMS and update/weight ratio
    jumping either way."""
    update_ratio_factor: float = 10.0
    """An update/weight ratio rises this many times above its own median (instead of
    ``baseline_factor``) to be a sudden change: Adam's per-step updates are noisier than outputs
    (one hard batch after quiet ones moved a healthy CNN's ratios 4.1-4.3x at every=1), and the
    fault it names, a learning rate that jumped, moves them 10-1000x."""
    update_ratio_floor: float = 1e-4
    """An update/weight ratio that is below this before and after is never a sudden change
    (healthy ratios sit near 1e-3; a parameter whose gradient is noise moves by ~1e-9)."""
    attention_logit_jump_floor: float = 10.0
    """A max attention logit below this is never a sudden rise, whatever the factor (small
    logits at initialisation grow by large factors while attention stays soft)."""
    dead_chance: float = 1e-3
    """A unit counts as suddenly dead when it is zero for every sample of a logging step while
    its active rate so far makes that this unlikely ((1 - rate)^samples below this)..."""
    dead_history_samples: float = 16
    """...once its rate is known from at least this many samples of earlier logging steps."""
    dead_smooth_zero: float = 1e-6
    """A GELU/SiLU unit is "off" on a sample when its |output| is below this (GELU(-6) ≈ -6e-9,
    SiLU(-16) ≈ -2e-6; a healthy unit's pre-activations never all sit that far below zero)."""
    escalate_steps: float = 3
    """When a cheap every-step signal fires (a gradient-norm spike, a NaN/Inf, one parameter's
    gradient norm jumping, a loss jump), this many next steps become logging steps."""
    escalate_share: float = 0.02
    """The escalations of the cheap signals (a gradient-norm spike, a parameter's gradient norm
    jumping, a loss jump) take at most this share of the run's time: the extra time of their
    logging steps is earned back at this rate, all but the latest escalation's before the next is
    granted (the first two may come at once; a NaN/Inf's is never refused). 1: no limit."""
    param_grad_jump: float = 5.0
    """One parameter's gradient norm this many times above or below its own running mean (or
    exactly 0 after being non-zero)..."""
    param_grad_sigma: float = 6.0
    """...and this many standard deviations of its own log norm away escalates (after
    ``grad_spike_min_history`` checked steps)."""
    param_grad_confirm_sigma: float = 3.0
    """A lasting jump: ``param_grad_jump`` times and this many standard deviations away from the
    norm's mean and σ before it, on two consecutive steps in the same direction, escalates too
    (0: off). Also judges the query/key slices of a fused projection (GPT-2's ``c_attn``,
    ``nn.MultiheadAttention``'s ``in_proj_weight``), whose single steps are too spiky for
    ``param_grad_sigma``..."""
    param_grad_confirm_history: float = 50
    """...once this many checked steps of the norm are known (a fresh model's attention gradients
    grow 10x in its first 40 steps)."""
    loss_jump: float = 3.0
    """A loss the model returns (a Hugging Face ``loss``) this many times its running mean (and
    ``param_grad_sigma`` deviations of its log) escalates."""

    # Stories (see introspect.debugger.story).
    story_window: float = 10
    """A finding is linked to the root cause it follows from (a dead layer, a NaN step, a gradient
    spike) when it lies up to this many logging steps (x ``every``) before or after it: a dead
    layer is often named a few steps after the gradients it silenced."""

    @classmethod
    def coerce(cls, value: Thresholds | Mapping[str, float] | None) -> Thresholds:
        """``value`` as Thresholds, every number checked (a Thresholds built by hand too).

        Raises:
            ConfigTypeError: not a dict or Thresholds, or a threshold that is not a number ("abc").
            ConfigError: an unknown name, or a threshold that is NaN, infinite or negative (each
                is a share, a ratio or a norm: none of them can be below zero).
        """
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(map(str, set(value) - known))
            if unknown:
                raise ConfigError(f"thresholds= got unknown names {unknown}; known: {sorted(known)}")
            value = cls(**dict(value))
        elif not isinstance(value, cls):
            raise ConfigTypeError(f"thresholds= takes a dict or introspect.Thresholds, got {type(value).__name__}")
        return cls(**{f.name: _threshold(f.name, getattr(value, f.name)) for f in fields(cls)})


def _threshold(name: str, value: object) -> float:
    """One threshold as a float: a real number (not a bool, not a string), finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"thresholds: {name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"thresholds: {name} must be a finite number >= 0, got {name}={value!r}")
    return number


# --------------------------------------------------------------------------- health
def check_activation_health(
    step: int, measures: Mapping[str, float], module_types: Mapping[str, str], limits: Thresholds
) -> list[Alert]:
    """Dead ReLU units and saturated sigmoid/tanh units, from ``dead/{m}`` (dead over a window of
    logging steps), ``dead_sudden/{m}`` (died at once, at this step) and ``saturated/{m}``."""
    alerts = []
    for key, fraction in measures.items():
        kind, _, where = key.partition("/")
        module_type = module_types.get(where.split("/")[0], "")
        zero = "~zero" if "GELU" in module_type or "SiLU" in module_type else "zero"  # |y| < dead_smooth_zero
        if kind == "dead_sudden" and fraction >= limits.dead_fraction:
            alerts.append(
                Alert(
                    "dead_units",
                    where,
                    step,
                    f"{fraction:.0%} of the units of {where} ({module_type}) output {zero} for every sample of this "
                    "step after being active before: they died at once (a weight or bias pushed them below zero?)",
                    {"dead_fraction": measures.get(f"dead_now/{where}", fraction), "died_fraction": fraction},
                    module_type=module_type,
                )
            )
        elif kind == "dead" and fraction >= limits.dead_fraction:
            alerts.append(
                Alert(
                    "dead_units",
                    where,
                    step,
                    f"{fraction:.0%} of the units of {where} ({module_type}) output {zero} for every sample seen",
                    {"dead_fraction": fraction},
                    module_type=module_type,
                )
            )
        elif kind == "saturated" and fraction >= limits.saturated_fraction:
            alerts.append(
                Alert(
                    "saturated_units",
                    where,
                    step,
                    f"{fraction:.0%} of the outputs of {where} ({module_type}) sit at its bounds, where its "
                    "slope (and the gradient through it) is ~0",
                    {"saturated_fraction": fraction},
                    module_type=module_type,
                )
            )
    return alerts


def median_without(ranked: list[float], value: float) -> float:
    """The median of sorted ``ranked`` with one occurrence of ``value`` left out, in O(log n): each
    layer is measured against the median of the *other* layers, and rebuilding that list per layer
    made a step of a 10,000-layer model quadratic (seconds per logging step)."""
    i = bisect.bisect_left(ranked, value)
    m = len(ranked) - 1

    def at(rank: int) -> float:  # the rank-th value of the list without position i
        return ranked[rank] if rank < i else ranked[rank + 1]

    return at(m // 2) if m % 2 else (at(m // 2 - 1) + at(m // 2)) / 2


@dataclass
class GradientHealth:
    """Per-layer gradient norms across logging steps: vanishing, exploding and stuck layers."""

    limits: Thresholds
    history: dict[str, list[float]] = field(default_factory=dict)
    """The last few logged gradient norms of each layer (the reference for a jump)."""

    def check(
        self,
        step: int,
        layer_grads: Mapping[str, tuple[float, float]],
        update_ratios: Mapping[str, float],
        nonfinite: Mapping[str, float] | None = None,
    ) -> list[Alert]:
        """``layer_grads``: ``{layer: (sum of squares, number of values)}`` of its parameters' grads,
        over their finite values. ``nonfinite``: ``{layer: how many of its gradient values are
        NaN/Inf}`` (see :func:`nonfinite_gradients`). Such a layer gets no vanishing or exploding
        verdict (its finite rest says nothing: often all zeros, the rows a batch did not touch):
        it is the non-finite check's finding, which names where the NaN began. It is left out of
        the median the other layers are measured against, and of its own norm history."""
        bad = {layer for layer, n in (nonfinite or {}).items() if n > 0}
        alerts: list[Alert] = []
        rms = {
            layer: math.sqrt(sq / count)
            for layer, (sq, count) in layer_grads.items()
            if count > 0 and math.isfinite(sq) and layer not in bad
        }
        ranked = sorted(rms.values())
        for layer, value in rms.items():
            others = len(ranked) > 1
            median = median_without(ranked, value) if others else value
            norm = math.sqrt(layer_grads[layer][0])
            if value < self.limits.vanishing_floor or (others and value < median * self.limits.vanishing_ratio):
                how_far = (
                    "no gradient reaches it"
                    if value == 0
                    else f"{median / value:.1e}x below the median layer's {median:.2e}"
                )
                alerts.append(
                    Alert(
                        "vanishing_gradient",
                        layer,
                        step,
                        f"RMS gradient {value:.2e}: {how_far}",
                        {"rms": value, "median_rms": median},
                    )
                )
            past = self.history.setdefault(layer, [])
            # The median only where a jump is possible at all: a norm at most ``exploding_jump``
            # times the smallest past one is at most that times the median (the usual case).
            jump = self.limits.exploding_jump
            possible = len(past) >= 3 and not (jump >= 0 and norm <= min(past) * jump)
            reference = statistics.median(past) if possible else None
            if norm > self.limits.exploding_norm:
                alerts.append(
                    Alert(
                        "exploding_gradient",
                        layer,
                        step,
                        f"gradient norm {norm:.2e} is above {self.limits.exploding_norm:.0e}",
                        {"norm": norm},
                    )
                )
            elif (
                reference is not None
                and reference > self.limits.vanishing_floor
                and norm > reference * self.limits.exploding_jump
            ):
                alerts.append(
                    Alert(
                        "exploding_gradient",
                        layer,
                        step,
                        f"gradient norm {norm:.2e} is {norm / reference:.0f}x its recent median {reference:.2e}",
                        {"norm": norm, "reference_norm": reference},
                    )
                )
            past.append(norm)
            del past[:-5]
        for param, ratio in update_ratios.items():
            if math.isfinite(ratio) and ratio < self.limits.stuck_ratio:
                alerts.append(
                    Alert(
                        "stuck_parameter",
                        param,
                        step,
                        f"optimizer.step() changed it by {ratio:.1e} of its norm: it is not learning "
                        "(learning rate 0, or not in the optimizer's param groups?)",
                        {"update_ratio": ratio},
                    )
                )
        return alerts

"""The debugger: what went wrong, where and when, from the numbers the hooks gathered.

Everything here runs on the host on small lists of floats that a step already moved in its one
transfer; no tensor is touched. Two families of findings:

* non-finite origin, checked every step: from the finiteness of each watched output's sum, of
  the inputs it read and of the gradients flowing back, the first module whose output went
  NaN/Inf while its inputs were finite (forward), or whose input gradient went NaN/Inf while the
  gradient reaching its output was finite (backward);
* health, on logging steps: dead or saturated units, vanishing, exploding or stuck layers. A
  layer whose gradient holds NaN/Inf gets no vanishing or exploding verdict (its RMS is taken
  over the finite values only, so it would read as ~0): that is the non-finite finding's. A
  module whose own weights are non-finite is said to be so (:func:`blame_nonfinite_weights`),
  not called the origin of a NaN it only passes on from the optimizer.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError, ConfigTypeError
from .terminal import counted

__all__ = [
    "Alert",
    "Thresholds",
    "CallRecord",
    "locate_nonfinite",
    "check_activation_health",
    "GradientHealth",
    "layer_of",
    "nonfinite_gradients",
    "blame_nonfinite_weights",
    "format_report",
    "alerts_markdown",
]


@dataclass(frozen=True)
class Alert:
    """One finding. ``where`` is a dotted module or parameter name (with an output suffix)."""

    kind: str
    where: str
    step: int
    message: str
    numbers: dict[str, float] = field(default_factory=dict)
    phase: str = ""
    module_type: str = ""

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind} at {self.where}: {self.message}"


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

    @classmethod
    def coerce(cls, value: "Thresholds | Mapping[str, float] | None") -> "Thresholds":
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


# --------------------------------------------------------------------------- non-finite origin
@dataclass
class CallRecord:
    """One call of a watched module on a checked step, in the order forward hooks fired."""

    module: str
    module_type: str
    producers: list[int] = field(default_factory=list)
    """Indices of earlier calls whose output this call read as input."""
    safe: bool = False
    """A parameter-free module that cannot turn finite values into NaN/Inf, forward or backward
    (ReLU, pooling, dropout, flatten, ...). Its output is not summed: it is finite exactly when its
    inputs are, and the gradient it passes back is finite exactly when the one it receives is."""
    model_output: bool = False
    """Its output is (a view of) the model's own output. When no call is marked so, a call whose
    output no watched call read is taken for the model's output."""


def _finite_by_label(labels: Sequence[tuple], values: Sequence[float]) -> list[tuple[tuple, bool]]:
    return [(label, math.isfinite(v)) for label, v in zip(labels, values)]


def _kind_of(values: Sequence[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "NaN"
    return "Inf"


def locate_nonfinite(
    step: int,
    calls: Sequence[CallRecord],
    labels: Sequence[tuple],
    values: Sequence[float],
) -> Alert | None:
    """The origin of this step's first NaN/Inf, or None when every checked sum is finite.

    ``labels`` name each sum, as :class:`introspect.step.Check` ``(kind, call, where)``: ``"in"``
    an input the call read that no earlier call produced, ``"out"`` an output, ``"grad"`` the
    gradient w.r.t. an output (in the order backward produced them), ``"model_in"`` the model's
    own input.
    """
    checked = _finite_by_label(labels, values)
    if all(ok for _, ok in checked):
        return None
    n = len(calls)
    out_ok = [True] * n
    own_in_ok = [True] * n
    first_bad_out: dict[int, str] = {}
    bad_values: dict[str, list[float]] = {}
    model_input_ok = True
    grad_events: list[tuple[int, str, bool]] = []
    for (label, ok), value in zip(checked, values):
        kind, call, where = label
        if kind == "out":
            if not ok:
                out_ok[call] = False
                first_bad_out.setdefault(call, where)
                bad_values.setdefault(where, []).append(value)
        elif kind == "in":
            own_in_ok[call] = own_in_ok[call] and ok
        elif kind == "model_in":
            model_input_ok = model_input_ok and ok
        elif kind == "grad":
            grad_events.append((call, where, ok))
            if not ok:
                bad_values.setdefault(where, []).append(value)

    def inputs_ok(i: int) -> bool:
        return own_in_ok[i] and all(out_ok[p] for p in calls[i].producers)

    for i, call in enumerate(calls):  # producers come first, so one pass settles safe calls
        if call.safe:
            out_ok[i] = inputs_ok(i)

    if not model_input_ok:
        return Alert(
            "nonfinite", "input", step,
            "the batch fed to the model already holds NaN/Inf: check the data pipeline",
            {}, phase="forward", module_type="",
        )
    forward_bad = [i for i in range(n) if not out_ok[i] and not calls[i].safe]
    if forward_bad:
        return _forward_origin(step, calls, forward_bad, first_bad_out, bad_values, inputs_ok)
    bad_grads = [(i, where) for i, where, ok in grad_events if not ok]
    if bad_grads:
        return _backward_origin(step, calls, grad_events, bad_grads[0], bad_values)
    return None


def _forward_origin(step, calls, forward_bad, first_bad_out, bad_values, inputs_ok) -> Alert:
    for i in forward_bad:
        if inputs_ok(i):
            where = first_bad_out[i]
            what = _kind_of(bad_values.get(where, []))
            later = len(forward_bad) - 1
            message = f"{what} first appears in the output of {where} ({calls[i].module_type}) while its inputs were finite"
            if later:
                message += f"; {counted(later, 'later module output')} inherit{'s' if later == 1 else ''} it"
            return Alert(
                "nonfinite", where, step, message,
                {"later_nonfinite_modules": float(later)}, phase="forward", module_type=calls[i].module_type,
            )
    i = forward_bad[0]
    where = first_bad_out[i]
    previous = [c.module for c in calls[:i] if c.module != calls[i].module]
    between = f"between {previous[-1]} and {calls[i].module}" if previous else f"before {calls[i].module}"
    return Alert(
        "nonfinite", where, step,
        f"{_kind_of(bad_values.get(where, []))} reaches {where} ({calls[i].module_type}) through its input: it was made by "
        f"code no watched module covers, {between} (a functional call in a forward?); "
        "watch more modules with include=[...] to pin it down",
        {}, phase="forward", module_type=calls[i].module_type,
    )


def _backward_origin(step, calls, grad_events, first_bad, bad_values) -> Alert:
    producer, where = first_bad
    grad_ok: dict[int, bool] = {}
    for i, _, ok in grad_events:
        grad_ok[i] = grad_ok.get(i, True) and ok
    consumers = [i for i, c in enumerate(calls) if producer in c.producers]
    # Gradients are checked in the order backward made them, so nothing reported before this one
    # was bad: a consumer with no event of its own (its output grad was not summed) was fine too.
    culprits = [i for i in consumers if not calls[i].safe and grad_ok.get(i, True)]
    what = _kind_of(bad_values.get(where, []))
    if culprits:
        i = culprits[0]
        return Alert(
            "nonfinite", calls[i].module, step,
            f"{what} gradient first appears in the backward of {calls[i].module} ({calls[i].module_type}): "
            f"the gradient reaching its output was finite, the one it passed to {where} was not",
            {}, phase="backward", module_type=calls[i].module_type,
        )
    outputs_known = any(c.model_output for c in calls)
    if not consumers and (calls[producer].model_output or not outputs_known):
        return Alert(
            "nonfinite", where, step,
            f"the gradient arriving at the model's output {where} is already {what}: the loss (or code "
            "after the model) produced it",
            {}, phase="backward", module_type=calls[producer].module_type,
        )
    return Alert(
        "nonfinite", where, step,
        f"{what} gradient first appears at the output of {where}, made by code after it that no watched "
        "module covers; watch more modules with include=[...] to pin it down",
        {}, phase="backward", module_type=calls[producer].module_type,
    )


# --------------------------------------------------------------------------- health
def check_activation_health(
    step: int, measures: Mapping[str, float], module_types: Mapping[str, str], limits: Thresholds
) -> list[Alert]:
    """Dead ReLU units and saturated sigmoid/tanh units, from ``dead/{m}`` and ``saturated/{m}``."""
    alerts = []
    for key, fraction in measures.items():
        kind, _, where = key.partition("/")
        module_type = module_types.get(where.split("/")[0], "")
        if kind == "dead" and fraction >= limits.dead_fraction:
            alerts.append(Alert(
                "dead_units", where, step,
                f"{fraction:.0%} of the units of {where} ({module_type}) output zero for every sample seen",
                {"dead_fraction": fraction}, module_type=module_type,
            ))
        elif kind == "saturated" and fraction >= limits.saturated_fraction:
            alerts.append(Alert(
                "saturated_units", where, step,
                f"{fraction:.0%} of the outputs of {where} ({module_type}) sit at its bounds, where its "
                "slope (and the gradient through it) is ~0",
                {"saturated_fraction": fraction}, module_type=module_type,
            ))
    return alerts


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
        for layer, value in rms.items():
            others = [v for k, v in rms.items() if k != layer]
            median = statistics.median(others) if others else value
            norm = math.sqrt(layer_grads[layer][0])
            if value < self.limits.vanishing_floor or (others and value < median * self.limits.vanishing_ratio):
                how_far = (
                    "no gradient reaches it" if value == 0
                    else f"{median / value:.1e}x below the median layer's {median:.2e}"
                )
                alerts.append(Alert(
                    "vanishing_gradient", layer, step,
                    f"RMS gradient {value:.2e}: {how_far}",
                    {"rms": value, "median_rms": median},
                ))
            past = self.history.setdefault(layer, [])
            reference = statistics.median(past) if len(past) >= 3 else None
            if norm > self.limits.exploding_norm:
                alerts.append(Alert(
                    "exploding_gradient", layer, step,
                    f"gradient norm {norm:.2e} is above {self.limits.exploding_norm:.0e}",
                    {"norm": norm},
                ))
            elif reference is not None and reference > self.limits.vanishing_floor and norm > reference * self.limits.exploding_jump:
                alerts.append(Alert(
                    "exploding_gradient", layer, step,
                    f"gradient norm {norm:.2e} is {norm / reference:.0f}x its recent median {reference:.2e}",
                    {"norm": norm, "reference_norm": reference},
                ))
            past.append(norm)
            del past[:-5]
        for param, ratio in update_ratios.items():
            if math.isfinite(ratio) and ratio < self.limits.stuck_ratio:
                alerts.append(Alert(
                    "stuck_parameter", param, step,
                    f"optimizer.step() changed it by {ratio:.1e} of its norm: it is not learning "
                    "(learning rate 0, or not in the optimizer's param groups?)",
                    {"update_ratio": ratio},
                ))
        return alerts


def layer_of(param: str) -> str:
    """The layer a parameter belongs to (``fc1`` for ``fc1.weight``): the unit of gradient health."""
    return param.rpartition(".")[0] or param


def nonfinite_gradients(histograms: Mapping[str, Any]) -> dict[str, float]:
    """``{layer: NaN/Inf count}`` of the ``grads/{param}`` records of a step (``HostStep.histograms``),
    for ``GradientHealth.check(..., nonfinite=)``; layers whose gradients are finite are left out."""
    counts: dict[str, float] = {}
    for full_tag, record in histograms.items():
        kind, _, param = full_tag.partition("/")
        if kind == "grads" and record.nonfinite > 0:
            layer = layer_of(param)
            counts[layer] = counts.get(layer, 0.0) + record.nonfinite
    return counts


def blame_nonfinite_weights(alert: Alert, histograms: Mapping[str, Any], earlier: Sequence[Alert] = ()) -> Alert:
    """``alert`` said the way it is true when the module's own weights are non-finite.

    A forward origin, "NaN first appears in the output of emb while its inputs were finite", is
    right about where but wrong about why when ``emb``'s weights already hold NaN (an optimizer
    step applied a NaN gradient): the module is not the culprit, its weights are. With the step's
    ``weights/{param}`` records (``HostStep.histograms``: the values that step's forward used),
    the finding becomes "weights of emb are non-finite (since step k's optimizer step)", k being
    the step of the latest NaN/Inf finding in ``earlier`` before this one. Any other alert, or
    one whose module's weights are finite, comes back unchanged.
    """
    if alert.kind != "nonfinite" or alert.phase != "forward" or alert.where == "input":
        return alert
    module = alert.where.split("/")[0]
    weights = {}
    for full_tag, record in histograms.items():
        kind, _, param = full_tag.partition("/")
        if kind == "weights" and record.nonfinite > 0 and (layer_of(param) == module or param.startswith(module + ".")):
            weights[param] = record
    if not weights:
        return alert
    since = [a.step for a in earlier if a.kind == "nonfinite" and a.step < alert.step]
    when = f"since step {max(since)}'s optimizer step" if since else f"already when step {alert.step} began"
    shown = ", ".join(
        f"{param} has {r.nonfinite:.0f} of {counted(r.numel, 'value')} NaN/Inf" for param, r in list(weights.items())[:3]
    )
    more = f", {counted(len(weights) - 3, 'more parameter')}" if len(weights) > 3 else ""
    numbers = dict(alert.numbers)
    numbers["nonfinite_weights"] = float(sum(r.nonfinite for r in weights.values()))
    if since:
        numbers["since_step"] = float(max(since))
    return Alert(
        "nonfinite", alert.where, alert.step,
        f"weights of {module} ({alert.module_type}) are non-finite ({when}): {shown}{more}; its "
        "inputs were finite, its output is not because of them",
        numbers, phase="forward", module_type=alert.module_type,
    )


# --------------------------------------------------------------------------- report
def _numbers_text(alert: Alert) -> str:
    """The measured numbers of a NaN/Inf finding: read in full by the replay of its step, or from
    a logged step's histograms (``at_step``) under the per-module check."""
    n = alert.numbers
    if "nonfinite_values" not in n:
        return ""
    source = f"step {int(n['at_step'])}" if "at_step" in n else "replayed"
    text = f" [{source}: {n['nonfinite_values']:.0f} of {counted(n['values'], 'value')} non-finite"
    if "finite_min" in n:
        text += f", the rest in [{n['finite_min']:.3g}, {n['finite_max']:.3g}]"
    if "upstream_min" in n:
        what = "its input" if alert.phase == "forward" else "the gradient it received"
        text += f"; {what} in [{n['upstream_min']:.3g}, {n['upstream_max']:.3g}]"
    return text + "]"


def format_report(alerts: Sequence[Alert], steps: int) -> str:
    """A short plain-text table for the terminal."""
    plural = "s" if steps != 1 else ""
    if not alerts:
        return f"introspect: no problems found in {steps} step{plural}."
    rows = [("step", "finding", "where", "details")]
    rows += [
        (str(a.step), a.kind + (f" ({a.phase})" if a.phase else ""), a.where, a.message + _numbers_text(a))
        for a in alerts
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    count = len(alerts)
    lines = [f"introspect: {count} finding{'s' if count != 1 else ''} in {steps} step{plural}"]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    return "\n".join(lines)


def alerts_markdown(alerts: Sequence[Alert]) -> str:
    """The same findings as a markdown table for TensorBoard's text dashboard."""
    lines = ["| step | finding | where | details |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {a.step} | {a.kind}{f' ({a.phase})' if a.phase else ''} | `{a.where}` | {a.message}{_numbers_text(a)} |"
        for a in alerts
    ]
    return "\n".join(lines)

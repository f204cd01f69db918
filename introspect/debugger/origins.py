"""Where the first non-finite value came from: the module (forward) or the gradient (backward) whose
sums went bad first, from a step's per-call records, and which weights a NaN spoiled."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..terminal import counted
from .alerts import Alert

__all__ = ["CallRecord", "locate_nonfinite", "layer_of", "nonfinite_gradients", "blame_nonfinite_weights"]


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
    bad_params: Collection[str] = (),
) -> Alert | None:
    """The origin of this step's first NaN/Inf, or None when every checked sum is finite.

    ``bad_params``: names of parameters whose gradient is non-finite. Where several modules read
    one input (q/k/v projections of one normalised stream) and the gradient passed back to it is
    the first bad one, the module whose own parameter gradient is non-finite is the one that made
    it (the others only passed finite gradients back).

    ``labels`` name each sum, as :class:`introspect.records.step.Check` ``(kind, call, where)``: ``"in"``
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
            "nonfinite",
            "input",
            step,
            "the batch fed to the model already holds NaN/Inf: check the data pipeline",
            {},
            phase="forward",
            module_type="",
        )
    forward_bad = [i for i in range(n) if not out_ok[i] and not calls[i].safe]
    if forward_bad:
        return _forward_origin(step, calls, forward_bad, first_bad_out, bad_values, inputs_ok)
    bad_grads = [(i, where) for i, where, ok in grad_events if not ok]
    if bad_grads:
        return _backward_origin(step, calls, grad_events, bad_grads[0], bad_values, bad_params)
    return None


def _forward_origin(step, calls, forward_bad, first_bad_out, bad_values, inputs_ok) -> Alert:
    for i in forward_bad:
        if inputs_ok(i):
            where = first_bad_out[i]
            what = _kind_of(bad_values.get(where, []))
            later = len(forward_bad) - 1
            message = (
                f"{what} first appears in the output of {where} ({calls[i].module_type}) while its inputs were finite"
            )
            if later:
                message += f"; {counted(later, 'later module output')} inherit{'s' if later == 1 else ''} it"
            return Alert(
                "nonfinite",
                where,
                step,
                message,
                {"later_nonfinite_modules": float(later)},
                phase="forward",
                module_type=calls[i].module_type,
            )
    i = forward_bad[0]
    where = first_bad_out[i]
    previous = [c.module for c in calls[:i] if c.module != calls[i].module]
    between = f"between {previous[-1]} and {calls[i].module}" if previous else f"before {calls[i].module}"
    return Alert(
        "nonfinite",
        where,
        step,
        f"{_kind_of(bad_values.get(where, []))} reaches {where} ({calls[i].module_type}) through its input: it was made by "
        f"code no watched module covers, {between} (a functional call in a forward?); "
        "watch more modules with include=[...] to pin it down",
        {},
        phase="forward",
        module_type=calls[i].module_type,
    )


def _backward_origin(step, calls, grad_events, first_bad, bad_values, bad_params: Collection[str] = ()) -> Alert:
    producer, where = first_bad
    grad_ok: dict[int, bool] = {}
    for i, _, ok in grad_events:
        grad_ok[i] = grad_ok.get(i, True) and ok
    consumers = [i for i, c in enumerate(calls) if producer in c.producers]
    # Gradients are checked in the order backward made them, so nothing reported before this one
    # was bad: a consumer with no event of its own (its output grad was not summed) was fine too.
    culprits = [i for i in consumers if not calls[i].safe and grad_ok.get(i, True)]
    if len(culprits) > 1 and bad_params:
        # Consumers of one input: the one whose own parameters got a non-finite gradient first.
        owns_bad = [i for i in culprits if any(p.startswith(calls[i].module + ".") for p in bad_params)]
        culprits = owns_bad + [i for i in culprits if i not in owns_bad]
    what = _kind_of(bad_values.get(where, []))
    if culprits:
        i = culprits[0]
        return Alert(
            "nonfinite",
            calls[i].module,
            step,
            f"{what} gradient first appears in the backward of {calls[i].module} ({calls[i].module_type}): "
            f"the gradient reaching its output was finite, the one it passed to {where} was not",
            {},
            phase="backward",
            module_type=calls[i].module_type,
        )
    outputs_known = any(c.model_output for c in calls)
    if not consumers and (calls[producer].model_output or not outputs_known):
        return Alert(
            "nonfinite",
            where,
            step,
            f"the gradient arriving at the model's output {where} is already {what}: the loss (or code "
            "after the model) produced it",
            {},
            phase="backward",
            module_type=calls[producer].module_type,
        )
    return Alert(
        "nonfinite",
        where,
        step,
        f"{what} gradient first appears at the output of {where}, made by code after it that no watched "
        "module covers; watch more modules with include=[...] to pin it down",
        {},
        phase="backward",
        module_type=calls[producer].module_type,
    )


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


def _in_experts(record: Any) -> str:
    """`` in experts[2]``: the slices of a fused-experts parameter that hold the NaN/Inf."""
    experts = getattr(record, "experts", None) or []
    if not experts:
        return ""
    more = f" and {len(experts) - 3} more" if len(experts) > 3 else ""
    return f" in experts[{', '.join(str(e) for e in experts[:3])}]{more}"


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
        f"{param} has {r.nonfinite:.0f} of {counted(r.numel, 'value')} NaN/Inf{_in_experts(r)}"
        for param, r in list(weights.items())[:3]
    )
    more = f", {counted(len(weights) - 3, 'more parameter')}" if len(weights) > 3 else ""
    numbers = dict(alert.numbers)
    numbers["nonfinite_weights"] = float(sum(r.nonfinite for r in weights.values()))
    if since:
        numbers["since_step"] = float(max(since))
    # Fused experts (one (E, ...) parameter for all of them): the expert whose slice went bad.
    experts = sorted({e for r in weights.values() for e in getattr(r, "experts", None) or ()})
    if experts:
        numbers["expert"] = float(experts[0])
    which = f"experts[{experts[0]}] of {module}" if len(experts) == 1 else module
    return Alert(
        "nonfinite",
        alert.where,
        alert.step,
        f"weights of {which} ({alert.module_type}) are non-finite ({when}): {shown}{more}; its "
        "inputs were finite, its output is not because of them",
        numbers,
        phase="forward",
        module_type=alert.module_type,
    )

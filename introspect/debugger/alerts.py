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

Findings form stories (:mod:`introspect.debugger.story`): each may name its ``cause``, the root
finding it follows from. The report and the ``diagnostics/alerts`` table open with the roots,
earliest first, each with one line of what to try (:data:`ADVICE`), then what followed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..terminal import counted, escape

__all__ = ["Alert", "format_report", "alerts_markdown", "ADVICE", "ROWS_PER_KIND"]


@dataclass(frozen=True)
class Alert:
    """One finding. ``where`` is a dotted module or parameter name (with an output suffix).

    ``cause`` is the root finding this one follows from (a gradient that vanished below a dead
    layer names the dead layer's finding), or None for a root. It is set once, when the finding is
    recorded (or when a root named a few steps later adopts it), and never takes part in ``==``."""

    kind: str
    where: str
    step: int
    message: str
    numbers: dict[str, float] = field(default_factory=dict)
    phase: str = ""
    module_type: str = ""
    cause: Alert | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind} at {self.where}: {self.message}"


ROWS_PER_KIND = 20
"""At most this many findings of one kind at one step are listed (in the report and in each
``diagnostics/alerts`` text); the rest are counted ("and 2,400 more vanishing_gradient findings")."""

FOLLOWERS_LISTED = 3
"""How many of a root's consequences its "followed by" line names before "and N more"."""

ADVICE: dict[str, str] = {
    "nonfinite": "find the operation that made the first NaN/Inf there (log/sqrt/division near 0, a half-precision "
    "overflow); if a loss or gradient spike came first, lower the learning rate or clip gradients",
    "nonfinite_rank": "look at that rank's batch and device: the others only received its NaN/Inf",
    "dead_units": "check the BatchNorm (or layer) before it: a very negative bias or shift turns the units off; "
    "lower the learning rate or use LeakyReLU/GELU",
    "saturated_units": "normalise its input (BatchNorm/LayerNorm), lower the initial weights, or use a "
    "non-saturating activation",
    "vanishing_gradient": "add normalisation or residual connections, use a ReLU-family activation or a "
    "better initialisation",
    "exploding_gradient": "clip gradients (clip_grad_norm_), lower the learning rate or add warm-up",
    "exploding_init": "initialise it with its fan-in in mind (nn.init.kaiming_normal_/xavier_normal_, or "
    "the model's own init) and look for a weight scaled by mistake",
    "stuck_parameter": "put it in the optimizer's param groups, with a learning rate above 0",
    "grad_norm_spike": "lower the learning rate or add warm-up; clip gradients",
    "attention_entropy_collapse": "add QK-norm or logit soft-capping; lower the learning rate",
    "attention_logit_growth": "add QK-norm or logit soft-capping; lower the learning rate",
    "activation_shift": "look at what changed just before it (the learning rate, a layer before it, the data); "
    "a fall to near 0 is often a dead layer upstream",
    "update_ratio_shift": "lower the learning rate or add warm-up; check the optimizer's state (a reset, a new "
    "param group)",
    "attention_not_seen": "if the attention is a custom kernel or flex_attention, use the sdpa or eager "
    "implementation (attn_implementation=...) on a debugging run to see it",
    "massive_activation": "look at the block's residual stream: add normalisation, or lower the learning rate",
    "logit_divergence": "add a z-loss on the output logits or lower the learning rate",
    "rank_divergence": "make every rank start from the same weights (broadcast them) and all-reduce gradients",
    "expert_collapse": "add or raise the load-balancing loss of the router",
    "router_logit_growth": "add a router z-loss (ST-MoE) or lower the router's learning rate",
    "grad_overflow": "routine under AMP: the GradScaler skips the step; look again only if it repeats every step",
    "out_of_memory": "lower the batch size, or use activation checkpointing or mixed precision",
}
"""One line of what to try per finding kind, shown under each root cause."""


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


def _kind(alert: Alert) -> str:
    return alert.kind + (f" ({alert.phase})" if alert.phase else "")


def _followed_by(followers: Sequence[Alert], code: str = "") -> str:
    """``followed by 34 findings: vanishing_gradient at fc1 (step 3), ... and 31 more``."""
    named = ", ".join(
        f"{a.kind} at {code}{escape(a.where)}{code} (step {a.step})" for a in followers[:FOLLOWERS_LISTED]
    )
    more = f", and {len(followers) - FOLLOWERS_LISTED:,} more" if len(followers) > FOLLOWERS_LISTED else ""
    return f"followed by {counted(len(followers), 'finding')}: {named}{more}"


def _capped(alerts: Iterable[Alert]) -> tuple[list[Alert], dict[tuple[int, str], int]]:
    """The findings to list, at most :data:`ROWS_PER_KIND` per (step, kind), and the count of the rest."""
    shown: list[Alert] = []
    counts: dict[tuple[int, str], int] = {}
    rest: dict[tuple[int, str], int] = {}
    for alert in alerts:
        key = (alert.step, alert.kind)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= ROWS_PER_KIND:
            shown.append(alert)
        else:
            rest[key] = rest.get(key, 0) + 1
    return shown, rest


def _rest_lines(rest: dict[tuple[int, str], int]) -> list[str]:
    return [f"and {n:,} more {kind} findings at step {step}" for (step, kind), n in rest.items()]


def story(alerts: Sequence[Alert]) -> tuple[list[tuple[Alert, list[Alert]]], list[Alert]]:
    """``([(root, its consequences)], consequences whose root is not in ``alerts``)``: roots
    earliest first (stable); a consequence is listed under its root."""
    present = {id(a) for a in alerts}
    followers: dict[int, list[Alert]] = {}
    roots: list[Alert] = []
    orphans: list[Alert] = []
    for alert in alerts:
        cause = alert.cause
        if cause is None:
            roots.append(alert)
        elif id(cause) in present:
            followers.setdefault(id(cause), []).append(alert)
        else:
            orphans.append(alert)  # e.g. a step's new findings whose root was found at an earlier step
    roots.sort(key=lambda a: a.step)
    return [(r, followers.get(id(r), [])) for r in roots], orphans


def format_report(alerts: Sequence[Alert], steps: int) -> str:
    """A short plain-text report for the terminal: the root causes first, earliest first, each with
    its numbers, one line of what to try and what followed from it."""
    plural = "s" if steps != 1 else ""
    if not alerts:
        return f"introspect: no problems found in {steps} step{plural}."
    stories, orphans = story(alerts)
    roots, rest = _capped([r for r, _ in stories] + orphans)
    followers = {id(r): f for r, f in stories}
    rows = [("step", "finding", "where", "details")]
    # names come from the model (a file's, possibly): one line each, whatever they hold
    rows += [(str(a.step), _kind(a), escape(a.where), escape(a.message + _numbers_text(a))) for a in roots]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    count = len(alerts)
    title = f"introspect: {count:,} finding{'s' if count != 1 else ''} in {steps:,} step{plural}"
    if len(stories) < count:
        title += f": {counted(len(stories), 'root cause')} first, then what followed"
    lines = [title]
    pad = " " * (sum(widths) + 6)
    advised: set[str] = set()
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            continue
        alert = roots[i - 1]
        if alert.cause is not None:
            lines.append(f"{pad}after {alert.cause.kind} at {escape(alert.cause.where)} (step {alert.cause.step})")
            continue
        advice = ADVICE.get(alert.kind)
        if advice is not None and advice not in advised:  # each piece of advice once: twice is noise
            advised.add(advice)
            lines.append(f"{pad}try: {advice}")
        if followers.get(id(alert)):
            lines.append(f"{pad}{_followed_by(followers[id(alert)])}")
    lines += [f"{pad}{line}" for line in _rest_lines(rest)]
    return "\n".join(lines)


def alerts_markdown(alerts: Sequence[Alert]) -> str:
    """The same findings as a markdown table for TensorBoard's text dashboard: the roots first,
    earliest first (with what to try and what followed), then each consequence, naming its root.
    At most :data:`ROWS_PER_KIND` rows per kind and step; the rest are counted under the table."""
    stories, orphans = story(alerts)
    roots, rest = _capped(r for r, _ in stories)
    followers = {id(r): f for r, f in stories}
    after, after_rest = _capped([f for _, fs in stories for f in fs] + orphans)
    lines = ["| step | finding | where | details |", "| --- | --- | --- | --- |"]
    advised: set[str] = set()
    for a in roots:
        details = escape(a.message + _numbers_text(a))
        advice = ADVICE.get(a.kind)
        if advice is not None and advice not in advised:
            advised.add(advice)
            details += f" **Try:** {escape(advice)}."
        if followers.get(id(a)):
            text = _followed_by(followers[id(a)], code="`")
            details += f" **{text[0].upper()}{text[1:]}.**"
        lines.append(f"| {a.step} | {_kind(a)} | `{escape(a.where)}` | {details} |")
    for a in after:
        cause = a.cause
        assert cause is not None
        lines.append(
            f"| {a.step} | {_kind(a)} | `{escape(a.where)}` | after {cause.kind} at `{escape(cause.where)}` "
            f"(step {cause.step}): {escape(a.message + _numbers_text(a))} |"
        )
    notes = _rest_lines(rest) + _rest_lines(after_rest)
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines)

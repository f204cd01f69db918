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

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..terminal import counted, escape

__all__ = ["Alert", "format_report", "alerts_markdown"]


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
    rows += [  # names come from the model (a file's, possibly): one line each, whatever they hold
        (
            str(a.step),
            a.kind + (f" ({a.phase})" if a.phase else ""),
            escape(a.where),
            escape(a.message + _numbers_text(a)),
        )
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
        f"| {a.step} | {a.kind}{f' ({a.phase})' if a.phase else ''} | `{escape(a.where)}` | "
        f"{escape(a.message + _numbers_text(a))} |"
        for a in alerts
    ]
    return "\n".join(lines)

"""The debugger's findings: what went wrong, where, and when, in words a person reads."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Alert", "format_report"]


@dataclass(frozen=True)
class Alert:
    """One finding. ``where`` is a dotted module or parameter name (with an output suffix)."""

    kind: str
    where: str
    step: int
    message: str
    numbers: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind} at {self.where}: {self.message}"


def format_report(alerts: list[Alert], steps: int) -> str:
    """A short plain-text table for the terminal."""
    if not alerts:
        return f"introspect: no problems found in {steps} step{'s' if steps != 1 else ''}."
    rows = [("step", "finding", "where", "details")]
    rows += [(str(a.step), a.kind, a.where, a.message) for a in alerts]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"introspect: {len(alerts)} finding{'s' if len(alerts) != 1 else ''} in {steps} steps"]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    return "\n".join(lines)


def alerts_markdown(alerts: list[Alert]) -> str:
    """The same findings as a markdown table for TensorBoard's text dashboard."""
    lines = ["| step | finding | where | details |", "| --- | --- | --- | --- |"]
    lines += [f"| {a.step} | {a.kind} | `{a.where}` | {a.message} |" for a in alerts]
    return "\n".join(lines)

"""One training step's worth of findings, kept on the device until the step ends.

During a step the hooks only append small device tensors here (histogram records, scalars, the
per-output sums of the non-finite check); no activation is kept. At the end of the step
``to_host`` stacks them and moves them to the host in one transfer: the one host sync of a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .stats import HistogramRecord, stat_dtype, tensor_record

__all__ = ["StepBuffer", "HostStep"]


@dataclass
class HostStep:
    """A finished step on the host, ready to be written."""

    step: int
    histograms: dict[str, HistogramRecord]
    scalars: dict[str, float]
    nonfinite: list[str]
    """Names whose output (in hook order) held NaN/Inf on this step, per the cheap sum check."""


@dataclass
class StepBuffer:
    step: int
    logging: bool
    histograms: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    finite_sums: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    closed: bool = False

    def add_histogram(self, tag: str, tensor: torch.Tensor) -> None:
        """Add one call's values; several calls in one step are merged into one histogram."""
        self.histograms.setdefault(tag, []).append((tensor.numel(), tensor_record(tensor)))

    def set_histogram(self, tag: str, tensor: torch.Tensor) -> None:
        """Replace the values (a parameter's gradient is final only after the last backward)."""
        self.histograms[tag] = [(tensor.numel(), tensor_record(tensor))]

    def add_scalar(self, tag: str, value: torch.Tensor) -> None:
        self.scalars[tag] = value.detach().reshape(())

    def add_finite_check(self, name: str, tensor: torch.Tensor) -> None:
        """One cheap device reduction: a sum is finite exactly when every value is (barring overflow)."""
        self.finite_sums.append((name, tensor.detach().sum(dtype=torch.float32)))

    def to_host(self) -> HostStep:
        self.closed = True
        parts: list[torch.Tensor] = []
        layout: list[tuple[str, str, int, int]] = []  # (kind, key, numel, length)
        for tag, calls in self.histograms.items():
            for numel, record in calls:
                parts.append(record)
                layout.append(("h", tag, numel, record.numel()))
        for tag, value in self.scalars.items():
            parts.append(value.reshape(1))
            layout.append(("s", tag, 1, 1))
        for name, value in self.finite_sums:
            parts.append(value.reshape(1))
            layout.append(("f", name, 1, 1))
        values = _one_transfer(parts)
        histograms: dict[str, list[HistogramRecord]] = {}
        scalars: dict[str, float] = {}
        nonfinite: list[str] = []
        pos = 0
        for kind, key, numel, length in layout:
            chunk = values[pos : pos + length]
            pos += length
            if kind == "h":
                histograms.setdefault(key, []).append(HistogramRecord.from_row(numel, chunk))
            elif kind == "s":
                scalars[key] = chunk[0]
            elif not math.isfinite(chunk[0]) and key not in nonfinite:
                nonfinite.append(key)
        self.histograms.clear()
        self.scalars.clear()
        self.finite_sums.clear()
        return HostStep(
            step=self.step,
            histograms={tag: HistogramRecord.merge(recs) for tag, recs in histograms.items()},
            scalars=scalars,
            nonfinite=nonfinite,
        )


def _one_transfer(parts: list[torch.Tensor]) -> list[float]:
    """Concatenate per device and copy to the host once per device (once, in practice)."""
    if not parts:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(i)
    values: list[float] = [0.0] * sum(p.numel() for p in parts)
    offsets = []
    pos = 0
    for p in parts:
        offsets.append(pos)
        pos += p.numel()
    for device, indices in by_device.items():
        dt = stat_dtype(device)
        flat = torch.cat([parts[i].to(dt) for i in indices]).cpu().tolist()
        k = 0
        for i in indices:
            n = parts[i].numel()
            values[offsets[i] : offsets[i] + n] = flat[k : k + n]
            k += n
    return values

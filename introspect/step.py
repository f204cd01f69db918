"""One training step's worth of findings, kept on the device until they are needed on the host.

During a step the hooks only append small device tensors here: histogram records, scalars,
debugger measures, and the per-tensor sums of the non-finite check; no activation is kept. The
sums cross to the host once per backward (or at the end of the step when there is none) and the
rest once at the end of a logging step, each time as one ``cat`` and one copy.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .diagnostics import CallRecord
from .stats import HistogramRecord, stat_dtype, tensor_record

__all__ = ["StepBuffer", "HostStep"]


@dataclass
class HostStep:
    """A finished step on the host, ready to be written and analysed."""

    step: int
    histograms: dict[str, HistogramRecord]
    scalars: dict[str, float]
    measures: dict[str, float]


@dataclass
class StepBuffer:
    step: int
    logging: bool
    checking: bool
    histograms: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    measures: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: list[CallRecord] = field(default_factory=list)
    check_labels: list[tuple] = field(default_factory=list)
    check_values: list[float] = field(default_factory=list)
    """Host copies of the sums in ``check_labels`` already moved; the rest are in ``_pending``."""
    reported: bool = False
    callback_queued: bool = False
    closed: bool = False
    _pending: list[torch.Tensor] = field(default_factory=list)
    _outputs: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)

    # ------------------------------------------------------------ records for TensorBoard
    def add_histogram(self, tag: str, tensor: torch.Tensor) -> None:
        """Add one call's values; several calls in one step are merged into one histogram."""
        self.histograms.setdefault(tag, []).append((tensor.numel(), tensor_record(tensor)))

    def set_histogram(self, tag: str, tensor: torch.Tensor) -> None:
        """Replace the values (a parameter's gradient is final only after the last backward)."""
        self.histograms[tag] = [(tensor.numel(), tensor_record(tensor))]

    def add_scalar(self, tag: str, value: torch.Tensor) -> None:
        self.scalars[tag] = value.detach().reshape(())

    def add_measure(self, key: str, value: torch.Tensor) -> None:
        """A number for the debugger only (e.g. ``dead/relu1``); the last call of a step wins."""
        self.measures[key] = value.detach().reshape(())

    # ------------------------------------------------------------ the non-finite check
    def add_check(self, label: tuple, tensor: torch.Tensor) -> None:
        """One cheap device reduction: a sum is finite exactly when every value is (barring overflow)."""
        self.check_labels.append(label)
        self._pending.append(tensor.detach().sum(dtype=torch.float32))

    def new_call(self, record: CallRecord) -> int:
        self.calls.append(record)
        return len(self.calls) - 1

    def mark_output(self, tensor: torch.Tensor, call: int) -> None:
        """Remember who produced ``tensor`` so a later module reading it needs no second sum."""
        self._outputs[id(tensor)] = (weakref.ref(tensor), call)

    def producer_of(self, tensor: torch.Tensor) -> int | None:
        entry = self._outputs.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # a freed tensor's id may be reused
            return None
        return entry[1]

    def sync_checks(self) -> bool:
        """Move the pending sums to the host (one transfer); True when any so far is not finite."""
        if self._pending:
            self.check_values.extend(_one_transfer(self._pending))
            self._pending = []
        return any(v != v or v in (float("inf"), float("-inf")) for v in self.check_values)

    # ------------------------------------------------------------ end of step
    def to_host(self) -> HostStep:
        """Everything but the checks, in one transfer; the buffer is closed afterwards."""
        self.closed = True
        self._outputs.clear()
        parts: list[torch.Tensor] = []
        layout: list[tuple[str, str, int, int]] = []  # (kind, key, numel, length)
        for tag, calls in self.histograms.items():
            for numel, record in calls:
                parts.append(record)
                layout.append(("h", tag, numel, record.numel()))
        for kind, table in (("s", self.scalars), ("m", self.measures)):
            for key, value in table.items():
                parts.append(value.reshape(1))
                layout.append((kind, key, 1, 1))
        values = _one_transfer(parts)
        histograms: dict[str, list[HistogramRecord]] = {}
        scalars: dict[str, float] = {}
        measures: dict[str, float] = {}
        pos = 0
        for kind, key, numel, length in layout:
            chunk = values[pos : pos + length]
            pos += length
            if kind == "h":
                histograms.setdefault(key, []).append(HistogramRecord.from_row(numel, chunk))
            elif kind == "s":
                scalars[key] = chunk[0]
            else:
                measures[key] = chunk[0]
        self.histograms.clear()
        self.scalars.clear()
        self.measures.clear()
        return HostStep(
            step=self.step,
            histograms={tag: HistogramRecord.merge(recs) for tag, recs in histograms.items()},
            scalars=scalars,
            measures=measures,
        )


def _one_transfer(parts: list[torch.Tensor]) -> list[float]:
    """Concatenate per device and copy to the host once per device (once, in practice)."""
    if not parts:
        return []
    devices = {p.device for p in parts}
    if len(devices) == 1:
        device = devices.pop()
        dt = stat_dtype(device)
        return torch.cat([p.reshape(-1).to(dt) for p in parts]).cpu().tolist()
    values: list[float] = []
    for p in parts:  # a model split over devices: rare, and still correct
        values.extend(p.reshape(-1).to(stat_dtype(p.device)).cpu().tolist())
    return values

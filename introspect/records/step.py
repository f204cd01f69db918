"""One training step's worth of findings, kept on the device until they are needed on the host.

During a step the hooks only append small device tensors here: histogram records, scalars,
debugger measures, and the per-tensor sums of the non-finite check; no activation is kept. The
sums cross to the host once per backward (or at the end of the step when there is none) and the
rest once at the end of a logging step, each time as one ``cat`` and one copy.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from .._torch import view_base
from ..debugger.origins import CallRecord
from ..runtime.amp import LOW_PRECISION
from .shards import ShardRecords, local_view
from .stats import RECORD_LEN, HistogramRecord, RecordBatch, stat_dtype

__all__ = ["StepBuffer", "HostStep", "Check", "CapturePolicy", "one_transfer", "transfer_array"]


class Check(NamedTuple):
    """What one sum of the non-finite check was taken of: ``kind`` is ``"model_in"`` (the model's
    own input), ``"in"`` (an input of call ``call`` that no earlier call produced), ``"out"`` (an
    output, named ``where``), ``"grad"`` (the gradient w.r.t. that output), ``"reduced_grads"``
    (DDP's averaged gradients) or ``"grad_norm"`` (the global gradient norm, which rides in the
    same transfer for the spike score and is no finiteness check)."""

    kind: str
    call: int = -1
    where: str = ""


class CapturePolicy:
    """Which histograms' small tensors a logging step may hold by reference, uncopied, until the
    step's next flush point (the forward's end, the backward's end, ``optimizer.step()``): kept by
    the watch across steps. The first logging step copies every tensor and watches its in-place
    version; a kind of tensor (a tag) found changed in place before its flush point (an output
    that ``ReLU(inplace=True)`` or ``x += ...`` rewrites) is copied from then on. A tag held by
    reference that is found changed later is copied from the next logging step on (its values on
    that one step are those after the change)."""

    def __init__(self) -> None:
        self.learned = False
        self.copied: set[str] = set()

    def hold(self, tag: str) -> bool:
        return self.learned and tag not in self.copied


_EMPTY: dict = {}


@dataclass
class HostStep:
    """A finished step on the host, ready to be written and analysed."""

    step: int
    histograms: dict[str, HistogramRecord]
    scalars: dict[str, float]
    measures: dict[str, float]
    _kinds: dict[str, dict[str, HistogramRecord]] | None = field(default=None, init=False, repr=False, compare=False)

    def of_kind(self, kind: str) -> dict[str, HistogramRecord]:
        """The histograms of one tag kind by name, in ``histograms``' order (``"grads"`` ->
        ``{"fc.weight": record}``; the same split as ``tag_name``). Several probes read a step's
        records by kind; the tags are split once per step, not once per probe (on the 201-module
        stack, ~800 tags parsed again by each). ``histograms`` is not to change after the first call."""
        kinds = self._kinds
        if kinds is None:
            kinds = {}
            for full_tag, record in self.histograms.items():
                kind_of, _, name = full_tag.partition("/")
                group = kinds.get(kind_of)
                if group is None:
                    group = kinds[kind_of] = {}
                group[name] = record
            self._kinds = kinds
        return kinds.get(kind, _EMPTY)


@dataclass
class StepBuffer:
    step: int
    logging: bool
    checking: bool
    histograms: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """tag -> [(numel, index in ``records``)], one entry per call."""
    records: RecordBatch = field(default_factory=RecordBatch)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    plain_scalars: dict[str, float] = field(default_factory=dict)
    """Scalars that are Python numbers already (a user probe's), written beside ``scalars``."""
    measures: dict[str, torch.Tensor] = field(default_factory=dict)
    measure_blocks: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list)
    """Measures added several at once (``add_measures``): keys and a 1-D tensor of their values."""
    _block_of: dict[str, int] = field(default_factory=dict)
    _measure_order: list[str | int] = field(default_factory=list)
    """Measure keys and block numbers in the order first added (the host's ``measures`` keep it)."""
    calls: list[CallRecord] = field(default_factory=list)
    check_labels: list[Check] = field(default_factory=list)
    check_values: list[float] = field(default_factory=list)
    """Host copies of the sums in ``check_labels`` already moved; the rest are in ``_pending``."""
    reported: bool = False
    nonfinite_counts: dict[str, float] | None = None
    """NaN/Inf values per watched output on a step the non-finite replay went over (set by the
    sentinel), for the health map: the step is recorded even off the logging cadence."""
    grad_norm: float | None = None
    """The global gradient norm of the step's last backward, when the non-finite sentinel read it."""
    callback_queued: bool = False
    """The end-of-backward callback that dispatches ``on_after_backward`` is queued for the
    backward under way (once per backward)."""
    ddp_sync: bool = False
    """The latest forward's backward all-reduces the gradients (DDP outside ``no_sync()``, on
    several ranks): they are averaged by the time ``on_after_reduction`` runs."""
    grads_overflowed: bool = False
    """GradScaler found this step's scaled gradients non-finite and skips the step: its gradient
    statistics are not judged (set by the non-finite check)."""
    call_index: int = -1
    """The non-finite check's number for the module call being dispatched (its ``on_output``
    sets it; an output-gradient event of that call sees it again); -1 for none."""
    call_args: Any = None
    """The inputs of the module call being dispatched to ``on_output``; None outside it (nothing
    holds on to activations between calls)."""
    closed: bool = False
    shards: ShardRecords | None = None
    """Under sharded training, the records of DTensor weights and gradients (combined across
    ranks at the end of a logging step); without it a DTensor's local shard is recorded alone."""
    capture: CapturePolicy | None = None
    """The watch's policy of holding small tensors by reference (None: copy each when added)."""
    _pending: list[torch.Tensor] = field(default_factory=list)
    _any_nonfinite: bool = False
    _outputs: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)
    _sums: dict[int, tuple[weakref.ref, torch.Tensor]] = field(default_factory=dict)
    _safe_readers_of: dict[int, bool] | None = None
    _safe_readers_for: int = -1

    # ------------------------------------------------------------ records for TensorBoard
    def add_histogram(self, tag: str, tensor: torch.Tensor, total: torch.Tensor | None = None) -> None:
        """Add one call's values; several calls in one step are merged into one histogram.
        ``total``: the check's sum of ``tensor``, when it has one (saves a pass over a big tensor)."""
        if self._sharded(tag, tensor):
            return
        tensor = local_view(tensor)
        if tensor.numel() == 0:  # an empty batch or a zero-width layer has no histogram
            return
        index = self._add_record(tag, tensor, total)  # first: a tensor it cannot read leaves no empty tag behind
        self.histograms.setdefault(tag, []).append((tensor.numel(), index))

    def _add_record(self, tag: str, tensor: torch.Tensor, total: torch.Tensor | None = None) -> int:
        capture = self.capture
        if capture is None:
            return self.records.add(tensor, total)
        return self.records.add(tensor, total, hold=capture.hold(tag), watch=not capture.learned)

    def settle(self) -> None:
        """A flush point: the tensors held by reference are copied now (one ``cat``), before
        anything can change them in place (the optimizer, gradient clipping, the next forward)."""
        if not self.logging or not len(self.records):
            return
        records = self.records
        records.flush()
        if records.changed and self.capture is not None:
            changed = set(records.changed)
            records.changed = []
            self.capture.copied.update(t for t, calls in self.histograms.items() if any(i in changed for _, i in calls))

    def set_histogram(self, tag: str, tensor: torch.Tensor) -> None:
        """Replace the values (a parameter's gradient is final only after the last backward)."""
        if self._sharded(tag, tensor):
            return
        tensor = local_view(tensor)
        if tensor.numel() == 0:
            return
        self.histograms[tag] = [(tensor.numel(), self._add_record(tag, tensor))]

    def _sharded(self, tag: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a shard whose record waits for the other ranks' (taken here)."""
        if self.shards is None or tag not in self.shards.combiner.tags:
            return False  # (a tag every rank combines, or the ranks would disagree)
        self.shards.set(tag, tensor)
        return True

    def add_scalar(self, tag: str, value: torch.Tensor) -> None:
        self.scalars[tag] = value.detach().reshape(())

    def add_plain_scalar(self, tag: str, value: float) -> None:
        self.plain_scalars[tag] = value

    def add_measure(self, key: str, value: torch.Tensor) -> None:
        """A number for the debugger only (e.g. ``dead/relu1``); the last call of a step wins."""
        if key not in self.measures and key not in self._block_of:
            self._measure_order.append(key)
        self.measures[key] = value.detach().reshape(())

    def add_measures(self, keys: tuple[str, ...], values: torch.Tensor) -> None:
        """``values[i]`` (a 1-D tensor) is the measure ``keys[i]``: one tensor for a group of
        modules, not a tensor (and a Python object or two) per module; the last call wins, as
        with ``add_measure``."""
        values = values.detach().reshape(-1)
        block_of = self._block_of
        if self.measures.keys().isdisjoint(keys) and block_of.keys().isdisjoint(keys):
            number = len(self.measure_blocks)
            self.measure_blocks.append((keys, values))
            self._measure_order.append(number)
            block_of.update(dict.fromkeys(keys, number))
        else:  # a key set before: (rare) one at a time, where the later value wins
            for i, key in enumerate(keys):
                self.add_measure(key, values[i])

    def measure(self, key: str) -> torch.Tensor | None:
        """This step's measure ``key`` so far (either kind), or None."""
        found = self.measures.get(key)
        if found is None and key in self._block_of:
            keys, values = self.measure_blocks[self._block_of[key]]
            found = values[keys.index(key)]
        return found

    # ------------------------------------------------------------ the non-finite check
    def add_check(self, label: Check, tensor: torch.Tensor) -> torch.Tensor | None:
        """One cheap device reduction: a sum is finite exactly when every value is (barring overflow).
        Returns the sum (None for half precision), which a histogram of the same tensor can reuse."""
        self.check_labels.append(label)
        tensor = local_view(tensor.detach())  # this rank's values: no collective on one rank alone
        if tensor.dtype in LOW_PRECISION:  # |x| summed, one pass too: +Inf and -Inf from an overflow sum to
            self._pending.append(torch.linalg.vector_norm(tensor, 1, dtype=torch.float32))  # Inf, not NaN
            return None  # a norm, not the sum a histogram could reuse
        total = tensor.sum(dtype=torch.float32)
        self._pending.append(total)
        return total

    def remember_sum(self, tensor: torch.Tensor, total: torch.Tensor | None) -> None:
        """The check's sum of ``tensor``, for a histogram of the same tensor to reuse."""
        if total is not None:
            self._sums[id(tensor)] = (weakref.ref(tensor), total)

    def known_sum(self, tensor: torch.Tensor) -> torch.Tensor | None:
        entry = self._sums.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # a freed tensor's id may be reused
            return None
        return entry[1]

    def new_call(self, record: CallRecord) -> int:
        self.calls.append(record)
        return len(self.calls) - 1

    def mark_output(self, tensor: torch.Tensor, call: int) -> None:
        """Remember who produced ``tensor`` so a later module reading it needs no second sum."""
        self._outputs[id(tensor)] = (weakref.ref(tensor), call)

    def producer_of(self, tensor: torch.Tensor) -> int | None:
        """The call whose output ``tensor`` is, or is a view of (``x.flatten(1)`` between two
        modules reads the first one's output); None when no watched call made it."""
        entry = self._outputs.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # a freed tensor's id may be reused
            base = view_base(tensor)
            return None if base is None else self.producer_of(base)
        return entry[1]

    def grad_check_needed(self, call: int) -> bool:
        """False when every reader of this call's output is finite-preserving: the gradient it gets
        is then finite exactly when the gradients those readers received were (checked already)."""
        if self._safe_readers_of is None or self._safe_readers_for != len(self.calls):
            readers: dict[int, list[bool]] = {}
            for record in self.calls:
                for producer in record.producers:
                    readers.setdefault(producer, []).append(record.safe)
            self._safe_readers_of = {i: all(flags) for i, flags in readers.items()}
            self._safe_readers_for = len(self.calls)
        return not self._safe_readers_of.get(call, False)

    def sync_checks(self) -> bool:
        """Move the pending sums to the host (one transfer); True when any so far is not finite."""
        if self._pending:
            pending, self._pending = self._pending, []
            values = one_transfer(pending)
            self.check_values.extend(values)
            # The sum of the sums is finite when every one is (a huge finite total only costs the
            # per-value look below).
            if not math.isfinite(sum(values)) and not all(math.isfinite(v) for v in values):
                self._any_nonfinite = True
        return self._any_nonfinite

    # ------------------------------------------------------------ end of step
    def to_host(self) -> HostStep:
        """Everything but the checks, in one transfer; the buffer is closed afterwards."""
        self.closed = True
        self._outputs.clear()
        self._sums.clear()
        self.settle()
        if self.capture is not None and self.logging:
            self.capture.learned = True
        parts: list[torch.Tensor] = []
        if len(self.records):
            parts.append(self.records.compute().reshape(-1))
        small = [*self.scalars.values(), *self.measures.values()]
        if small:
            parts.append(torch.stack(small).reshape(-1))
        parts.extend(values for _, values in self.measure_blocks)
        values = transfer_array(parts)
        n = len(self.records)
        rows = values[: n * RECORD_LEN].reshape(n, RECORD_LEN)
        broken = np.flatnonzero(~np.isfinite(rows[:, 1:3]).all(axis=1)).tolist()
        if broken:  # NaN/Inf somewhere: redo those rows from their finite values (a second transfer)
            rows[broken] = self.records.masked_rows(broken).cpu().to(torch.float64).numpy()
        # One host array, one record per row (its counts a view of it), not a list per record.
        records = HistogramRecord.from_rows(self.records.numels, rows)
        histograms = {
            tag: records[calls[0][1]] if len(calls) == 1 else HistogramRecord.merge([records[i] for _, i in calls])
            for tag, calls in self.histograms.items()
        }
        if self.shards is not None:  # every rank, at the same step (see shards.py)
            histograms.update(self.shards.combine())
        rest = values[n * RECORD_LEN :].tolist()
        n_scalars = len(self.scalars)
        scalars = dict(zip(self.scalars, rest[:n_scalars]))
        singles = dict(zip(self.measures, rest[n_scalars : n_scalars + len(self.measures)]))
        at = n_scalars + len(self.measures)
        blocks = []
        for keys, _ in self.measure_blocks:
            blocks.append(rest[at : at + len(keys)])
            at += len(keys)
        measures: dict[str, float] = {}
        for entry in self._measure_order:  # the order first added, the value last added
            if isinstance(entry, int):
                measures.update(zip(self.measure_blocks[entry][0], blocks[entry]))
            else:
                measures[entry] = singles[entry]
        measures.update(singles)  # a key set alone after its block: the later value
        scalars.update(self.plain_scalars)
        self.plain_scalars.clear()
        self.histograms.clear()
        self.scalars.clear()
        self.measures.clear()
        self.measure_blocks.clear()
        self._block_of.clear()
        self._measure_order.clear()
        self.records = RecordBatch()
        return HostStep(step=self.step, histograms=histograms, scalars=scalars, measures=measures)


def transfer_array(parts: list[torch.Tensor]) -> np.ndarray:
    """``one_transfer`` as one float64 host array (the same values), for callers that slice it."""
    if not parts:
        return np.zeros(0)
    devices = {p.device for p in parts}
    if len(devices) == 1:
        device = devices.pop()
        if all(p.dim() == 0 for p in parts):
            host = torch.stack(parts).cpu()
        else:
            host = torch.cat([p.reshape(-1) for p in parts]).to(stat_dtype(device)).cpu()
    else:  # a model split over devices: rare, and still correct
        host = torch.cat([p.reshape(-1).to(stat_dtype(p.device)).cpu() for p in parts])
    return host.to(torch.float64).numpy()


def one_transfer(parts: list[torch.Tensor]) -> list[float]:
    """Concatenate per device and copy to the host once per device (once, in practice)."""
    if not parts:
        return []
    devices = {p.device for p in parts}
    if len(devices) == 1:
        device = devices.pop()
        if all(p.dim() == 0 for p in parts):  # sums and norms: one stack, read as they are (float32)
            return torch.stack(parts).tolist()
        dt = stat_dtype(device)
        return torch.cat([p.reshape(-1) for p in parts]).to(dt).cpu().tolist()
    values: list[float] = []
    for p in parts:  # a model split over devices: rare, and still correct
        values.extend(p.reshape(-1).to(stat_dtype(p.device)).cpu().tolist())
    return values

"""The training health map: every watched module over every logging step, in one picture per statistic.

>>> hm = HealthMap()                                           # doctest: +SKIP
>>> hm.add(host.step, host, watcher.alerts)     # at each logging step, live
>>> image = hm.render("grad_rms")               # HWC uint8, for add_image(..., dataformats="HWC")
>>> hm = health_map_from_events("runs/exp1")    # or afterwards, from the run's event files

A watched resnet18 writes ~250 histogram tags; nobody looks at 250 plots. Here rows are the
modules in execution order (input at the top), columns the logging steps, and the colour one
statistic, so a layer that goes dead, a gradient that fades towards the input or a NaN that
spreads from one layer downwards is one glance. Cells where the debugger reported a finding are
outlined in red, and the findings are listed under the map.

| stat | the colour | from |
| --- | --- | --- |
| ``grad_rms`` | log10 of the RMS gradient w.r.t. the module's output | ``activation_grads/{m}`` |
| ``activation_std`` | the output's standard deviation (log scale) | ``activations/{m}`` |
| ``dead_fraction`` | share of a ReLU's units zero for every sample (the debugger's measure) | ``dead/{m}`` (live only) |
| ``update_ratio`` | log10 of ``‖Δw‖ / ‖w‖`` of the module's ``weight`` (its first parameter without one) | ``update_ratio/{p}`` |
| ``nonfinite`` | NaN/Inf values in the output and the gradient w.r.t. it | the histograms' counts |
| ``saved_bytes`` | log10 bytes saved for backward while the module ran (``log=[..., "memory"]``) | ``memory/saved/{m}`` |

Offline (:func:`health_map_from_events`) everything comes back from the event files except the
dead fraction: the watcher measures it per unit, across batches, and writes only the finding
(``diagnostics/alerts``), not the number. What a histogram does prove is shown instead: 1 where
every logged output value was exactly 0 (every unit dead on that batch); every other cell stays
"not measured" (a histogram that reaches down to 0 cannot tell a dead unit from a quiet one), and
the dead-unit findings are outlined as they are live. Non-finite counts come from the
``nonfinite/{m}`` scalars, which hold the same sum (output and gradient) the live map shows.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..debugger.alerts import Alert
from ..errors import ConfigError, LoadError
from ..records.stats import HistogramRecord
from ..records.step import HostStep
from ..records.tags import ALERTS_TAG, HEALTH_MAP_TAG, tag_name

__all__ = ["STATS", "StatSpec", "HealthMap", "health_map_from_events", "find_run", "health_map_tag"]


@dataclass(frozen=True)
class StatSpec:
    """How one statistic is drawn."""

    name: str
    label: str
    """The map's title."""
    unit: str
    """The colour bar's label: what its numbers are."""
    log: bool
    """Coloured by log10 of the value (exact zeros get their own colour)."""
    cmap: str
    limits: tuple[float, float] | None = None
    """Fixed colour limits (in the drawn units); None: the data's own range."""


STATS: dict[str, StatSpec] = {
    "grad_rms": StatSpec(
        "grad_rms", "log10 RMS gradient w.r.t. the module's output", "log10 RMS gradient", True, "viridis"
    ),
    "activation_std": StatSpec("activation_std", "log10 std of the module's output", "log10 std", True, "cividis"),
    "dead_fraction": StatSpec(
        "dead_fraction", "share of dead units (ReLU)", "share of dead units", False, "magma_r", (0.0, 1.0)
    ),
    "update_ratio": StatSpec(
        "update_ratio", "log10 update/weight ratio of the module's weight", "log10 |update| / |weight|", True, "plasma"
    ),
    "nonfinite": StatSpec(
        "nonfinite", "NaN/Inf values in the output and its gradient", "log10(1 + NaN/Inf count)", False, "Reds"
    ),
    "saved_bytes": StatSpec(
        "saved_bytes", "log10 bytes saved for backward while the module ran", "log10 bytes", True, "YlGnBu"
    ),
}
"""Every statistic a health map can show, in the order ``introspect map`` draws them."""


def health_map_tag(stat: str) -> str:
    """The image tag of one statistic's map: ``diagnostics/health_map/{stat}``."""
    return f"{HEALTH_MAP_TAG}/{stat}"


class HealthMap:
    """Per-module statistics over logging steps, fed live by the watcher or from event files.

    Args:
        max_columns: the most logging steps kept; past it every other column is dropped (the
            first and the latest stay), so a long run costs bounded memory and a picture
            of readable width. Findings are kept whatever the thinning.
    """

    def __init__(self, max_columns: int = 400) -> None:
        if max_columns < 2:
            raise ConfigError(f"max_columns must be >= 2, got {max_columns}")
        self.max_columns = max_columns
        self.rows: list[str] = []
        self.steps: list[int] = []
        self.findings: list[Alert] = []
        self.offline = False
        """True for a map read from event files (the dead fraction is then only what they prove)."""
        self._values: dict[str, dict[tuple[str, int], float]] = {s: {} for s in STATS}
        self._row_set: set[str] = set()
        self._finding_keys: set[tuple[str, str, int]] = set()

    # ----------------------------------------------------------------- feeding
    def add(self, step: int, host: HostStep, alerts: Iterable[Alert] = ()) -> None:
        """One logging step as the watcher has it: ``host = buffer.to_host()``, and the findings so
        far (all of them each time is fine: each is kept once)."""
        values, order = host_values(host)
        self.add_values(step, values, order)
        self.add_findings(alerts)

    def add_values(self, step: int, values: Mapping[str, Mapping[str, float]], order: Iterable[str] = ()) -> None:
        """``values[stat][row]`` at ``step``; ``order``: rows in execution order (new ones are
        appended in that order, then any others in the order they come)."""
        for row in (*order, *(r for per_row in values.values() for r in per_row)):
            if row not in self._row_set:
                self._row_set.add(row)
                self.rows.append(row)
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
        for stat, per_row in values.items():
            cells = self._values[stat]
            for row, value in per_row.items():
                cells[(row, step)] = float(value)
        if len(self.steps) > self.max_columns:
            self._thin()

    def add_findings(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            key = (alert.kind, alert.where, alert.step)
            if key not in self._finding_keys:
                self._finding_keys.add(key)
                self.findings.append(alert)

    def _thin(self) -> None:
        kept = self.steps[::2]
        if kept[-1] != self.steps[-1]:
            kept.append(self.steps[-1])
        gone = set(self.steps) - set(kept)
        self.steps = kept
        for cells in self._values.values():
            for key in [k for k in cells if k[1] in gone]:
                del cells[key]

    # ----------------------------------------------------------------- reading
    def available(self) -> list[str]:
        """The statistics that have at least one measured cell."""
        return [s for s in STATS if self._values[s]]

    def matrix(self, stat: str) -> np.ndarray:
        """``rows × steps`` of raw values (NaN: not measured there)."""
        spec = _spec(stat)
        out = np.full((len(self.rows), len(self.steps)), np.nan)
        row_index = {r: i for i, r in enumerate(self.rows)}
        col_index = {s: j for j, s in enumerate(self.steps)}
        for (row, step), value in self._values[spec.name].items():
            out[row_index[row], col_index[step]] = value
        return out

    def marks(self) -> list[tuple[int, int, Alert]]:
        """``(row, column, alert)`` of each finding that has a row: the column is the first logged
        step at or after the finding's step (a NaN found between logging steps shows on the next)."""
        out = []
        for alert in self.findings:
            rows = _rows_of(alert.where, self.rows)
            column = next((j for j, s in enumerate(self.steps) if s >= alert.step), len(self.steps) - 1)
            out.extend((i, column, alert) for i in rows if self.steps)
        return out

    def render(self, stat: str) -> np.ndarray:
        """The map of one statistic as an HWC uint8 image (``add_image(..., dataformats="HWC")``)."""
        from ..records.visuals import health_map_image

        spec = _spec(stat)
        raw = self.matrix(stat)
        with np.errstate(divide="ignore", invalid="ignore"):
            if spec.log:
                shown = np.where(raw > 0, np.log10(raw), np.where(raw == 0, -np.inf, np.nan))
            elif spec.name == "nonfinite":
                shown = np.log10(1.0 + raw)
            else:
                shown = raw
        note = ""
        if spec.name == "dead_fraction" and self.offline:
            note = (
                "from event files: 1 where every logged output value was 0; a partial dead fraction is "
                "measured live only (the run's findings are outlined)"
            )
        return health_map_image(
            rows=self.rows,
            steps=self.steps,
            values=shown,
            marks=self.marks(),
            title=spec.label,
            unit=spec.unit,
            cmap=spec.cmap,
            limits=spec.limits,
            zero_colour=spec.log,
            findings=self.findings,
            note=note,
        )

    def write(self, writer: Any, step: int, stats: Iterable[str] | None = None) -> list[str]:
        """``diagnostics/health_map/{stat}`` of every statistic that has data (or of ``stats``) at
        ``step``; returns the tags written. One picture costs ~0.1-0.3 s: draw it on a cadence."""
        written = []
        for stat in stats if stats is not None else self.available():
            if not self._values[_spec(stat).name] or not self.rows:
                continue
            writer.add_image(health_map_tag(stat), self.render(stat), step, dataformats="HWC")
            written.append(health_map_tag(stat))
        return written


def _spec(stat: str) -> StatSpec:
    spec = STATS.get(stat)
    if spec is None:
        raise ConfigError(f"unknown health map statistic {stat!r}; one of {', '.join(STATS)}")
    return spec


def _rows_of(where: str, rows: list[str]) -> list[int]:
    """The rows a finding belongs to: its own, the outputs of that module (``lstm`` -> ``lstm/0``),
    or, for a parameter (``fc.weight``), its module's."""
    exact = [i for i, r in enumerate(rows) if r == where]
    if exact:
        return exact
    outputs = [i for i, r in enumerate(rows) if r.split("/")[0] == where]
    if outputs:
        return outputs
    owner = where.rpartition(".")[0]
    return [i for i, r in enumerate(rows) if owner and r.split("/")[0] == owner]


# --------------------------------------------------------------------------- the numbers
def rms(sum_squares: float, count: float) -> float:
    return math.sqrt(max(sum_squares, 0.0) / count) if count > 0 else math.nan


def std(total: float, sum_squares: float, count: float) -> float:
    if count <= 0:
        return math.nan
    mean = total / count
    return math.sqrt(max(sum_squares / count - mean * mean, 0.0))


def host_values(host: HostStep) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``(values[stat][row], rows in execution order)`` of one live step.

    Activations are recorded in the order modules finished their forward; a module logged only
    through its gradient (``log=`` without activations) comes in the order backward reached it,
    reversed.
    """
    values: dict[str, dict[str, float]] = {s: {} for s in STATS}
    forward: list[str] = []
    backward: list[str] = []
    for full_tag, record in host.histograms.items():
        kind, name = tag_name(full_tag)
        if kind == "activations":
            forward.append(name)
            values["activation_std"][name] = _record_std(record)
        elif kind == "activation_grads":
            backward.append(name)
            values["grad_rms"][name] = rms(record.sum_squares, record.finite_count)
        else:
            continue
        values["nonfinite"][name] = values["nonfinite"].get(name, 0.0) + record.nonfinite
    for key, value in host.measures.items():
        kind, _, where = key.partition("/")
        if kind == "dead":
            values["dead_fraction"][where] = value
    values["update_ratio"] = _module_ratios(
        {tag_name(t)[1]: v for t, v in host.scalars.items() if tag_name(t)[0] == "update_ratio"}
    )
    values["saved_bytes"] = {m: v for t, v in host.scalars.items() if (m := _saved_module(t)) is not None}
    order = forward + [n for n in reversed(backward) if n not in set(forward)]
    return values, order


def _saved_module(full_tag: str) -> str | None:
    """The module of a ``memory/saved/{module}`` scalar, else None."""
    kind, name = tag_name(full_tag)
    return name.removeprefix("saved/") if kind == "memory" and name.startswith("saved/") else None


def _record_std(record: HistogramRecord) -> float:
    return std(record.sum, record.sum_squares, record.finite_count)


def _module_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """One ratio per module: its ``weight``'s, else its first parameter's (a bias moves much more
    than its weight, and the weight is what a learning rate is tuned for)."""
    out: dict[str, float] = {}
    for param, value in ratios.items():
        module, _, leaf = param.rpartition(".")
        module = module or param
        if not math.isfinite(value):
            continue
        if leaf == "weight" or module not in out:
            out[module] = value
    return out


# --------------------------------------------------------------------------- from event files
_GUIDANCE = {"histograms": 0, "scalars": 0, "tensors": 0, "images": 1, "audio": 1, "compressedHistograms": 1}


def find_run(rundir: str | os.PathLike) -> Path:
    """The directory holding the event files of one run: ``rundir`` itself, or its one run below.

    Raises:
        LoadError: no such directory, no event files, or several runs (they are listed).
    """
    root = Path(rundir)
    if not root.is_dir():
        raise LoadError(f"{root}: no such directory")
    runs = sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})
    if not runs:
        raise LoadError(f"no TensorBoard event files (events.out.tfevents.*) under {root}")
    if root in runs:
        return root
    if len(runs) > 1:
        shown = ", ".join(str(r.relative_to(root)) for r in runs[:6]) + (
            f" and {len(runs) - 6} more" if len(runs) > 6 else ""
        )
        raise LoadError(f"{root} holds {len(runs)} runs ({shown}); give one of them")
    return runs[0]


def health_map_from_events(rundir: str | os.PathLike, max_columns: int = 400) -> HealthMap:
    """The health map of a finished (or running) ``watch`` run, from its event files alone.

    Raises:
        LoadError: no run there, or it has no ``activations/`` or ``activation_grads/``
            histograms (not a run ``watch`` wrote with those kinds).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = find_run(rundir)
    acc = EventAccumulator(str(run), size_guidance=_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    histogram_tags = [t for t in tags.get("histograms", []) if tag_name(t)[0] in ("activations", "activation_grads")]
    if not histogram_tags:
        raise LoadError(
            f"{run} has no activations/ or activation_grads/ histograms: not a run watch() wrote "
            "(or one with log= leaving both out)"
        )
    params = {tag_name(t)[1] for t in tags.get("histograms", []) if tag_name(t)[0] in ("weights", "grads")}
    steps: dict[int, dict[str, dict[str, float]]] = {}

    def cell(stat: str, step: int, row: str, value: float) -> None:
        steps.setdefault(step, {s: {} for s in STATS})[stat][row] = value

    forward, backward = [], []
    for full_tag in histogram_tags:
        kind, name = tag_name(full_tag)
        (forward if kind == "activations" else backward).append(name)
        for event in acc.Histograms(full_tag):
            h = event.histogram_value
            if kind == "activations":
                cell("activation_std", event.step, name, std(h.sum, h.sum_squares, h.num))
                if h.num > 0 and h.max == 0 and h.min == 0:  # every value 0: every unit dead on this batch
                    cell("dead_fraction", event.step, name, 1.0)
            else:
                cell("grad_rms", event.step, name, rms(h.sum_squares, h.num))
            steps[event.step]["nonfinite"].setdefault(name, 0.0)
    for full_tag in tags.get("scalars", []):
        kind, name = tag_name(full_tag)
        if kind == "nonfinite" and name not in params:
            for event in acc.Scalars(full_tag):
                cell("nonfinite", event.step, name, event.value)
        elif kind == "update_ratio":
            for event in acc.Scalars(full_tag):
                steps.setdefault(event.step, {s: {} for s in STATS}).setdefault("_ratios", {})[name] = event.value
        elif (module := _saved_module(full_tag)) is not None:
            for event in acc.Scalars(full_tag):
                cell("saved_bytes", event.step, module, event.value)
    hm = HealthMap(max_columns=max_columns)
    hm.offline = True
    order = forward + [n for n in reversed(backward) if n not in set(forward)]
    for step in sorted(steps):
        values = steps[step]
        values["update_ratio"] = _module_ratios(values.pop("_ratios", {}))
        hm.add_values(step, values, order)
    hm.add_findings(read_alerts(acc))
    return hm


_ALERT_ROW = re.compile(r"^\| (\d+) \| (\w+)(?: \((\w+)\))? \| `([^`]*)` \| (.*) \|$")


def read_alerts(acc: Any) -> list[Alert]:
    """The findings of a run, from the last ``diagnostics/alerts`` text (it lists them all)."""
    full = f"{ALERTS_TAG}/text_summary"
    if full not in acc.Tags().get("tensors", []):
        return []
    events = acc.Tensors(full)
    if not events:
        return []
    text = b"".join(events[-1].tensor_proto.string_val).decode("utf-8", "replace")
    alerts = []
    for line in text.splitlines():
        match = _ALERT_ROW.match(line.strip())
        if match:
            step, kind, phase, where, message = match.groups()
            alerts.append(Alert(kind, where, int(step), message, phase=phase or ""))
    return alerts

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

import bisect
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..debugger.alerts import Alert
from ..errors import ConfigError, LoadError, warn
from ..load.files import open_regular, scan_logdir
from ..records.budget import parse_health_data
from ..records.eventfile import CorruptRecordError, read_records
from ..records.stats import HistogramRecord
from ..records.step import HostStep
from ..records.tags import ALERTS_TAG, HEALTH_DATA_TAG, health_map_tag, stored_text_tag, tag_name

__all__ = [
    "STATS",
    "StatSpec",
    "HealthMap",
    "health_map_from_events",
    "save_health_maps",
    "find_run",
    "health_map_tag",
    "read_alerts",
    "parse_alerts",
    "MAX_ROWS",
]


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


MAX_ROWS = 200
"""The most modules one map draws (a row is 0.14 inch; past ~200 the names overlap and the picture
only grows: 20,000 rows took 1.4 GB). A model with more draws every module with a finding and
the others evenly spaced in execution order, and the map says how many it left out;
:meth:`HealthMap.matrix` keeps every row."""


class HealthMap:
    """Per-module statistics over logging steps, fed live by the watcher or from event files.

    Args:
        max_columns: the most logging steps kept; past it every other column is dropped (the
            first and the latest stay), so a long run costs bounded memory and a picture
            of readable width. Findings are kept whatever the thinning.
        max_rows: the most modules a picture draws (see ``MAX_ROWS``); every row is kept in
            the data (:meth:`matrix`) whatever the number.
    """

    def __init__(self, max_columns: int = 400, max_rows: int = MAX_ROWS) -> None:
        if max_columns < 2:
            raise ConfigError(f"max_columns must be >= 2, got {max_columns}")
        if max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
        self.max_columns = max_columns
        self.max_rows = max_rows
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

    def matrix(self, stat: str, rows: list[int] | None = None) -> np.ndarray:
        """``rows × steps`` of raw values (NaN: not measured there); ``rows``: only these (indices
        into ``self.rows``, in this order)."""
        spec = _spec(stat)
        rows = list(range(len(self.rows))) if rows is None else rows
        out = np.full((len(rows), len(self.steps)), np.nan)
        row_index = {self.rows[i]: k for k, i in enumerate(rows)}
        col_index = {s: j for j, s in enumerate(self.steps)}
        for (row, step), value in self._values[spec.name].items():
            k = row_index.get(row)
            if k is not None:
                out[k, col_index[step]] = value
        return out

    def marks(self) -> list[tuple[int, int, Alert]]:
        """``(row, column, alert)`` of each finding that has a row: the column is the first logged
        step at or after the finding's step (a NaN found between logging steps shows on the next).

        A finding belongs to its own row, else to the outputs of that module (``lstm`` ->
        ``lstm/0``), else, for a parameter (``fc.weight``), to its module's: found by name in
        two indexes, so many findings on many rows cost their sum, not their product."""
        if not self.steps:
            return []
        exact = {r: [i] for i, r in enumerate(self.rows)}
        outputs: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            outputs.setdefault(r.split("/")[0], []).append(i)
        out: list[tuple[int, int, Alert]] = []
        last = len(self.steps) - 1
        for alert in self.findings:
            owner = alert.where.rpartition(".")[0]
            rows = exact.get(alert.where) or outputs.get(alert.where) or (outputs.get(owner, []) if owner else [])
            column = min(bisect.bisect_left(self.steps, alert.step), last)
            out.extend((i, column, alert) for i in rows)
        return out

    def drawn_rows(self) -> list[int]:
        """The rows :meth:`render` draws: all of them, or past ``max_rows`` every row with a
        finding (the first ``max_rows`` of them) and the others evenly spaced, in order."""
        n = len(self.rows)
        if n <= self.max_rows:
            return list(range(n))
        flagged = sorted({i for i, _, _ in self.marks()})[: self.max_rows]
        room = self.max_rows - len(flagged)
        taken = set(flagged)
        others = [i for i in range(n) if i not in taken]
        return sorted(flagged + [others[k * len(others) // room] for k in range(room)])

    def render(self, stat: str) -> np.ndarray:
        """The map of one statistic as an HWC uint8 image (``add_image(..., dataformats="HWC")``)."""
        from ..records.visuals import health_map_image

        spec = _spec(stat)
        drawn = self.drawn_rows()
        raw = self.matrix(stat, drawn)
        with np.errstate(divide="ignore", invalid="ignore"):
            if spec.log:
                shown = np.where(raw > 0, np.log10(raw), np.where(raw == 0, -np.inf, np.nan))
            elif spec.name == "nonfinite":
                shown = np.log10(1.0 + raw)
            else:
                shown = raw
        notes = []
        if len(drawn) < len(self.rows):
            notes.append(
                f"{len(drawn)} of {len(self.rows)} modules drawn: every one with a finding, the others evenly "
                "spaced in execution order"
            )
        if spec.name == "dead_fraction" and self.offline:
            notes.append(
                "from event files: 1 where every logged output value was 0; a partial dead fraction is "
                "measured live only (the run's findings are outlined)"
            )
        position = {i: k for k, i in enumerate(drawn)}
        return health_map_image(
            rows=[self.rows[i] for i in drawn],
            steps=self.steps,
            values=shown,
            marks=[(position[i], j, a) for i, j, a in self.marks() if i in position],
            title=spec.label,
            unit=spec.unit,
            cmap=spec.cmap,
            limits=spec.limits,
            zero_colour=spec.log,
            findings=self.findings,
            note="; ".join(notes),
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


def save_health_maps(hm: HealthMap, stats: Iterable[str], out: str, run: str) -> list[tuple[str, str]]:
    """Each statistic's map (every one ``hm`` has data for, when ``stats`` is empty) as a PNG: ``out``
    for one, ``{out without .png}_{stat}.png`` each for several; returns ``(stat, path)`` pairs.
    A statistic the run has no data for is a ``ConfigError`` naming ``run`` and what it has."""
    from ..records.visuals import save_png

    chosen = list(stats) or hm.available()
    missing = [s for s in chosen if s not in hm.available()]
    if missing:
        raise ConfigError(f"{run} has no data for {', '.join(missing)}; it has {', '.join(hm.available())}")
    base = out[:-4] if out.lower().endswith(".png") else out
    saved = []
    for stat in chosen:
        path = out if len(chosen) == 1 else f"{base}_{stat}.png"
        save_png(hm.render(stat), path)
        saved.append((stat, path))
    return saved


def _spec(stat: str) -> StatSpec:
    spec = STATS.get(stat)
    if spec is None:
        raise ConfigError(f"unknown health map statistic {stat!r}; one of {', '.join(STATS)}")
    return spec


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
    seen = set(forward)
    order = forward + [n for n in reversed(backward) if n not in seen]
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
def find_run(rundir: str | os.PathLike) -> Path:
    """The directory holding the event files of one run: ``rundir`` itself, or its one run below.

    Raises:
        LoadError: no such directory, no event files, or several runs (they are listed).
    """
    return _run_files(rundir)[0]


def _run_files(rundir: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The run's directory and its event files, from one listing of each directory under
    ``rundir`` (:func:`~introspect.load.files.scan_logdir`: links that leave it are not followed,
    a FIFO named like an event file is not opened; each is named in a warning)."""
    root = Path(rundir)
    if not root.is_dir():
        raise LoadError(f"{root}: no such directory")
    scan = scan_logdir(root)
    for line in scan.refused:
        warn(f"skipped {line}")
    if not scan.runs:
        raise LoadError(f"no TensorBoard event files (events.out.tfevents.*) under {root}")
    if root in scan.runs:
        return root, scan.runs[root]
    if len(scan.runs) > 1:
        runs = list(scan.runs)
        shown = ", ".join(str(r.relative_to(root)) for r in runs[:6]) + (
            f" and {len(runs) - 6} more" if len(runs) > 6 else ""
        )
        raise LoadError(f"{root} holds {len(runs)} runs ({shown}); give one of them")
    return next(iter(scan.runs.items()))


@dataclass
class _RunEvents:
    """What the map needs of a run's events, each value with the position it was read at."""

    histograms: dict[str, dict[int, tuple[int, Any]]] = field(default_factory=dict)
    """tag -> step -> (position, HistogramProto); tags in the order first seen."""
    scalars: dict[str, dict[int, tuple[int, float]]] = field(default_factory=dict)
    alerts: list[tuple[int, int, str]] = field(default_factory=list)
    """Every ``diagnostics/alerts`` text: (position, step, text); the last is the whole story when
    the watch closed, the others each step's new findings."""
    health_data: dict[int, tuple[int, str]] = field(default_factory=dict)
    """step -> (position, text) of ``diagnostics/health_data``: every module's numbers at that
    logging step, written when the run's per-module histograms went to a budget."""
    starts: list[tuple[int, int]] = field(default_factory=list)
    """(position, step) of each ``session_log`` START."""

    def freshness(self) -> Callable[[int, int], bool]:
        """``fresh(position, step)``: whether a value read at ``position`` for ``step`` outlived
        every later START. A START at step s (a run restarted from a checkpoint) makes the values
        read before it at steps >= s stale, as TensorBoard purges them; here that is one suffix
        minimum over the STARTs and a bisection per value, not a pass over every value per START."""
        if not self.starts:
            return lambda position, step: True
        positions = [p for p, _ in self.starts]
        lowest_after = list(itertools.accumulate(reversed([s for _, s in self.starts]), min))[::-1]

        def fresh(position: int, step: int) -> bool:
            k = bisect.bisect_right(positions, position)
            return k == len(positions) or step < lowest_after[k]

        return fresh


def _read_run(files: Iterable[Path]) -> _RunEvents:
    """Every histogram, scalar and the findings text of a run's event files: one pass over each
    file, in name order, keeping only what the map draws (time and memory linear in the files)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    run = _RunEvents()
    alerts_tag = stored_text_tag(ALERTS_TAG)
    health_tag = stored_text_tag(HEALTH_DATA_TAG)
    position = 0
    for path in files:
        try:
            with open_regular(path) as stream:
                for payload in read_records(stream, os.fstat(stream.fileno()).st_size):
                    position += 1
                    try:
                        event = Event.FromString(payload)
                    except (DecodeError, RecursionError, ValueError):
                        warn(f"skipped an event of {path} that is not a TensorBoard event")
                        continue
                    if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                        run.starts.append((position, event.step))
                    if not event.HasField("summary"):
                        continue
                    for value in event.summary.value:
                        kind = value.WhichOneof("value")
                        if kind == "histo" and tag_name(value.tag)[0] in ("activations", "activation_grads"):
                            run.histograms.setdefault(value.tag, {})[event.step] = (position, value.histo)
                        elif kind == "simple_value" and (
                            tag_name(value.tag)[0] in ("nonfinite", "update_ratio") or _saved_module(value.tag)
                        ):
                            run.scalars.setdefault(value.tag, {})[event.step] = (position, value.simple_value)
                        elif kind == "tensor" and value.tag == alerts_tag:
                            text = b"".join(value.tensor.string_val).decode("utf-8", "replace")
                            run.alerts.append((position, event.step, text))
                        elif kind == "tensor" and value.tag == health_tag:
                            text = b"".join(value.tensor.string_val).decode("utf-8", "replace")
                            run.health_data[event.step] = (position, text)
        except CorruptRecordError as e:
            warn(f"{path}: {e}; the rest of the file is skipped")
        except OSError as e:  # not a regular file (any more), vanished, unreadable
            warn(f"skipped {path}: {e.strerror or e}")
    return run


def health_map_from_events(rundir: str | os.PathLike, max_columns: int = 400, max_rows: int = MAX_ROWS) -> HealthMap:
    """The health map of a finished (or running) ``watch`` run, from its event files alone.

    The files are read here (:func:`_read_run`), not by TensorBoard's EventAccumulator, which
    lists the folder again for every file and keeps every tag's events: 5,000 one-event files
    took 50 s, a 3.4 MB file of 20,000 tags 96 s. Rows are the modules that have
    ``activations/`` or ``activation_grads/`` histograms, nothing else: a scalar of another
    name is not a module.

    Raises:
        LoadError: no run there, or it has no ``activations/`` or ``activation_grads/``
            histograms (not a run ``watch`` wrote with those kinds).
    """
    run_dir, files = _run_files(rundir)
    run = _read_run(files)
    fresh = run.freshness()
    if not run.histograms and not run.health_data:
        raise LoadError(
            f"{run_dir} has no activations/ or activation_grads/ histograms: not a run watch() wrote "
            "(or one with log= leaving both out)"
        )
    steps: dict[int, dict[str, dict[str, float]]] = {}

    def cell(stat: str, step: int, row: str, value: float) -> None:
        steps.setdefault(step, {s: {} for s in STATS})[stat][row] = value

    forward: list[str] = []
    backward: list[str] = []
    for full_tag, events in run.histograms.items():
        kind, name = tag_name(full_tag)
        (forward if kind == "activations" else backward).append(name)
        for step, (position, h) in events.items():
            if not fresh(position, step):
                continue
            if kind == "activations":
                cell("activation_std", step, name, std(h.sum, h.sum_squares, h.num))
                if h.num > 0 and h.max == 0 and h.min == 0:  # every value 0: every unit dead on this batch
                    cell("dead_fraction", step, name, 1.0)
            else:
                cell("grad_rms", step, name, rms(h.sum_squares, h.num))
            steps[step]["nonfinite"].setdefault(name, 0.0)
    rows = set(forward) | set(backward)
    params = set()
    for full_tag, events in run.scalars.items():
        kind, name = tag_name(full_tag)
        if kind == "update_ratio":
            params.add(name)
        module = _saved_module(full_tag)
        for step, (position, value) in events.items():
            if not fresh(position, step):
                continue
            if kind == "nonfinite" and name in rows:
                cell("nonfinite", step, name, value)
            elif kind == "update_ratio":
                steps.setdefault(step, {s: {} for s in STATS}).setdefault("_ratios", {})[name] = value
            elif module is not None:
                cell("saved_bytes", step, module, value)
    # A budgeted run (records/budget.py) wrote every module's live numbers as one text a step:
    # they cover the modules whose histograms were not written, dead fraction included.
    data_order: list[str] = []  # every module the texts name, in first-seen order
    in_data: set[str] = set()
    for step, (position, text) in sorted(run.health_data.items()):
        if not fresh(position, step):
            continue
        order_here, values_here = parse_health_data(text)
        for row in order_here:
            if row not in in_data:
                in_data.add(row)
                data_order.append(row)
        for stat, per_row in values_here.items():
            if stat in STATS:
                for row, value in per_row.items():
                    cell(stat, step, row, value)
    rows |= in_data
    hm = HealthMap(max_columns=max_columns, max_rows=max_rows)
    hm.offline = not run.health_data
    seen = set(forward)
    order = forward + [n for n in reversed(backward) if n not in seen]
    order = data_order + [r for r in order if r not in in_data]
    for step in sorted(steps):
        values = steps[step]
        ratios = _module_ratios(values.pop("_ratios", {}))
        values["update_ratio"] = {m: v for m, v in ratios.items() if m in rows} | values["update_ratio"]
        hm.add_values(step, values, order if not hm.steps else ())
    for position, step, text in reversed(run.alerts):  # the whole story first, then what only a step held
        if fresh(position, step):
            hm.add_findings(parse_alerts(text))
    return hm


_ALERT_ROW = re.compile(r"^\| (\d+) \| (\w+)(?: \((\w+)\))? \| `([^`]*)` \| (.*) \|$")
_AFTER = re.compile(r"^after (\w+) at `([^`]*)` \(step (\d+)\): ")
_ROOT_NOTES = re.compile(r" \*\*Try:\*\* .*$| \*\*Followed by .*$")


def read_alerts(acc: Any) -> list[Alert]:
    """The findings of a run from its ``diagnostics/alerts`` texts: the last one (the whole story,
    written at the end of the watch), then any finding only an earlier step's text holds (a run
    that ended without closing its watch)."""
    full = stored_text_tag(ALERTS_TAG)
    if full not in acc.Tags().get("tensors", []):
        return []
    events = acc.Tensors(full)
    alerts: list[Alert] = []
    seen: set[tuple[str, str, int]] = set()
    for event in reversed(events):
        for alert in parse_alerts(b"".join(event.tensor_proto.string_val).decode("utf-8", "replace")):
            key = (alert.kind, alert.where, alert.step)
            if key not in seen:
                seen.add(key)
                alerts.append(alert)
    return alerts


def parse_alerts(text: str) -> list[Alert]:
    """The findings listed in a ``diagnostics/alerts`` markdown table (``alerts_markdown``), each
    consequence linked to its root (``cause``) when the root is in the same table."""
    alerts = []
    by_key: dict[tuple[str, str, int], Alert] = {}
    for line in text.splitlines():
        match = _ALERT_ROW.match(line.strip())
        if match:
            step, kind, phase, where, message = match.groups()
            after = _AFTER.match(message)
            cause = None
            if after is not None:
                cause = by_key.get((after.group(1), after.group(2), int(after.group(3))))
                message = message[after.end() :]
            else:
                message = _ROOT_NOTES.sub("", message)
            alert = Alert(kind, where, int(step), message, phase=phase or "", cause=cause)
            by_key[(kind, where, int(step))] = alert
            alerts.append(alert)
    return alerts

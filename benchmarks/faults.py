"""The fault table (``--faults``): which NaN/Inf detector names which planted fault, at what cost.

Four faults, each planted at step ``FAULT_STEP`` of a fresh, seeded model, under three detectors:
this project, ``detect_anomaly`` and naive ``isfinite`` hooks. Each detector is the Runner variant
whose per-step cost the timing table measures (``Detector.variant``), so the one judged is the one
timed. Runs in the harness's own process, on CPU, after every worker has been forked.
"""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.isolation import failure, log, one_thread, quiet
from benchmarks.models import build_model
from benchmarks.report import fmt_ratio, plural
from benchmarks.timing import Schedule, interleave, timed_rows
from benchmarks.variants import Runner, close_runners

__all__ = [
    "FAULTS",
    "FAULT_DETECTORS",
    "FAULT_MODELS",
    "FAULT_STEP",
    "fault_costs",
    "fault_model",
    "faults_section",
    "plant",
    "run_faults",
]

FAULT_STEP = 3
"""The step (0-based) each fault is planted at; every run trains one step past it, so a detector
that reports late shows a wrong step."""


def _times_nan(out):
    return out * float("nan")


def _overflow(out):
    return out * 1e38 * 1e38  # +-inf wherever out is not 0; no NaN made here


def _sqrt_at_zero(out):
    import torch

    # Forward: sqrt(0) = 0, the output is unchanged. Backward: d sqrt/dx at 0 is inf, so the
    # gradient reaching ``out`` is inf (NaN where the incoming gradient is 0).
    return out + torch.sqrt(out - out.detach())


def _log_of_negative(h):
    import torch

    return torch.log(h)  # NaN wherever h < 0, -inf where it is 0


@dataclass(frozen=True)
class Fault:
    """What is planted (``make`` turns a tensor into the faulty one) and where: "module" =
    inside a module's forward, after its own computation; "gap" = in the parent's forward
    between two modules, no module of its own. ``phase``: where a right answer places it."""

    label: str
    make: Callable
    where: str
    phase: str = "forward"


FAULTS = {
    "forward_nan": Fault("forward NaN: a layer's output times NaN", _times_nan, "module"),
    "forward_inf": Fault("forward Inf: a layer's output overflows (× 1e38 × 1e38)", _overflow, "module"),
    "backward_nan": Fault(
        "NaN only in backward: + sqrt(x - x.detach()), exactly 0 forward", _sqrt_at_zero, "module", "backward"
    ),
    "unwatched": Fault(
        "NaN in unwatched code: torch.log of a negative, in the parent's forward", _log_of_negative, "gap"
    ),
}


def _identity(h):
    return h


def _fault_cnn():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class FaultCNN(nn.Module):
        """Five named layers; ``gap`` runs between fc1 and fc2 in this forward."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc1 = nn.Linear(128, 32)
            self.fc2 = nn.Linear(32, 1)
            self.gap = _identity

        def forward(self, x):
            h = self.pool(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1)
            return self.fc2(F.relu(self.gap(self.fc1(h))))

    torch.manual_seed(0)
    model = FaultCNN()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16, 1)).float()
    sites = {"forward_nan": "conv2", "forward_inf": "conv1", "backward_nan": "fc1", "unwatched": ("", "fc1", "fc2")}
    desc = "a CNN of five named layers (conv1, conv2, pool, fc1, fc2), batch 16 of 3x16x16, BCEWithLogits, Adam"
    return model, x, y, sites, desc


def _fault_gpt2():
    model, x, _, desc = build_model("gpt2", "cpu")
    mlp = model.transformer.h[1].mlp
    mlp.gap = _identity

    def mlp_forward(hidden_states):
        # GPT2MLP.forward, with the parent's own code between c_fc and act.
        return mlp.dropout(mlp.c_proj(mlp.act(mlp.gap(mlp.c_fc(hidden_states)))))

    mlp.forward = mlp_forward
    sites = {
        "forward_nan": "transformer.h.1.mlp.c_fc",
        "forward_inf": "transformer.h.0.mlp.c_proj",
        "backward_nan": "transformer.h.0.attn.c_attn",
        "unwatched": ("transformer.h.1.mlp", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.act"),
    }
    return model, x, None, sites, desc


@dataclass(frozen=True)
class FaultModel:
    """A model of the fault table. ``build() -> (model, x, y, sites, description)``: ``sites``
    maps each fault to the module it is planted in, or, for the gap, (parent, module before,
    module after); the parent's ``gap`` function is the hook point for code between the two.
    ``cost``/``quick_cost``: (K, rounds) of the in-line cost measurement."""

    build: Callable
    cost: tuple[int, int]
    quick_cost: tuple[int, int]


FAULT_MODELS = {
    "fault_cnn": FaultModel(_fault_cnn, cost=(20, 5), quick_cost=(5, 3)),  # always
    "gpt2": FaultModel(_fault_gpt2, cost=(10, 5), quick_cost=(3, 3)),  # when among --models
}


def fault_model(name: str):
    """(model, x, y, sites, description) of fault model ``name``, seeded (see ``FaultModel``)."""
    if name not in FAULT_MODELS:
        raise ValueError(f"unknown fault model {name!r}; choose from {', '.join(FAULT_MODELS)}")
    return FAULT_MODELS[name].build()


def plant(model, fault: str, site, step: Callable[[], int]) -> None:
    """Plant ``fault`` in ``model`` at ``site``: it runs only while ``step()`` is FAULT_STEP. A
    module fault wraps the module's own forward (instance attribute), so every hook, whoever
    registered it and in whatever order, sees the faulty output as the module's."""
    make = FAULTS[fault].make

    def _planted_call(h):  # the name the detect_anomaly judge looks for in forward tracebacks
        return make(h) if step() == FAULT_STEP else h

    if FAULTS[fault].where == "gap":
        model.get_submodule(site[0]).gap = _planted_call
        return
    module = model.get_submodule(site)
    forward = module.forward

    def planted_forward(*args, **kwargs):
        return _planted_call(forward(*args, **kwargs))

    module.forward = planted_forward


def _expected(fault: str, site) -> str:
    if FAULTS[fault].where == "gap":
        return f"between `{site[1]}` and `{site[2]}`"
    return f"`{site}` ({FAULTS[fault].phase})"


def _judge(fault: str, site, found: dict) -> str:
    """right / wrong / missed, from what a detector ``found``: ``named``, the module it blamed
    (None: it found nothing), ``step``, and where it says so, ``between`` (the two modules code
    outside any module lies between) or ``through_plant`` (its forward traceback runs through the
    planted code: detect_anomaly names no module). The unwatched fault is right when both its
    neighbours are named, or the parent whose forward holds it ("" is the root)."""
    if found.get("named") is None:
        return "missed"
    if found.get("step") != FAULT_STEP:
        return "wrong"
    if "through_plant" in found:
        return "right" if found["through_plant"] else "wrong"
    if FAULTS[fault].where == "gap":
        parent, before, after = site
        ok = found.get("between") == (before, after) or found["named"] == parent
    else:
        ok = found["named"] == site
    return "right" if ok else "wrong"


NOTHING = {"named": None, "said": "nothing", "step": None}


def _watch_answer(runner: Runner, error: str | None, caught: list) -> dict:
    """This project's answer: the first ``nonfinite`` alert of the watcher."""
    alerts = [a for a in runner.state.alerts if a.kind == "nonfinite"]
    if not alerts:
        return dict(NOTHING)
    a = alerts[0]
    module = a.where.split("/")[0]
    found = {"named": module, "said": f"`{module}` ({a.phase}), step {a.step}", "step": a.step}
    between = re.search(r"between (\S+) and (\S+?)[ ;(]", a.message + " ")
    if between:
        found.update(between=(between[1], between[2]), said=f"between `{between[1]}` and `{between[2]}`, step {a.step}")
    return found


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _anomaly_answer(runner: Runner, error: str | None, caught: list) -> dict:
    """detect_anomaly's answer: the backward function its RuntimeError names and the innermost
    frame of the forward traceback it warns with. It names no module; it is judged right when
    that traceback runs through the planted code (the op it blames was made inside it)."""
    if error is None:
        return dict(NOTHING, said="nothing (no error raised)")
    node = re.search(r"Function '(\w+)'", error)
    node = node[1] if node else error.splitlines()[0][:80]
    trace = next((str(w.message) for w in caught if "Traceback of forward call" in str(w.message)), "")
    frames = _FRAME.findall(trace)
    said = f"`{node}`, step {runner.step_no}"
    if frames:
        path, line, func = frames[-1]
        said += f"; forward at {Path(path).name}:{line} in {func}"
    return {
        "named": node,
        "said": said,
        "step": runner.step_no,
        "through_plant": any(func == "_planted_call" for _, _, func in frames),
    }


def _isfinite_answer(runner: Runner, error: str | None, caught: list) -> dict:
    """The naive hooks' answer: the first module whose output, or output gradient, was flagged."""
    if runner.state.first is None:
        return dict(NOTHING)
    name, phase, step = runner.state.first
    what = "output" if phase == "forward" else "output gradient"
    return {"named": name, "said": f"`{name or '(root)'}` {what}, step {step}", "step": step}


@dataclass(frozen=True)
class Detector:
    """A NaN/Inf detector: the Runner ``variant`` that is it (and whose cost the timing table
    has), how to read its ``answer`` after the run, and whether it ``stops`` training with a
    RuntimeError when it finds something."""

    label: str
    variant: str
    answer: Callable[[Runner, str | None, list], dict]
    stops: bool = False


FAULT_DETECTORS = {
    "watch": Detector('this project: watch(on_nonfinite="warn")', "watch_default", _watch_answer),
    "detect_anomaly": Detector("detect_anomaly (check_nan=True)", "detect_anomaly", _anomaly_answer, stops=True),
    "isfinite_hooks": Detector("naive isfinite hooks", "isfinite_hooks", _isfinite_answer),
}


def detect(name: str, fault: str, detector: Detector, logdir: Path) -> dict:
    """Plant ``fault`` in a fresh fault model ``name``, train it past FAULT_STEP under
    ``detector``, and judge what the detector says."""
    model, x, y, sites, _ = fault_model(name)
    runner: Runner | None = None
    # Planted before the detector hooks in, as a user's bug would be; it reads the step of the
    # runner made below when it runs.
    plant(model, fault, sites[fault], lambda: runner.step_no)
    error = None
    with warnings.catch_warnings(record=True) as caught, quiet():
        warnings.simplefilter("always")  # recorded, never shown: the answers read them
        runner = Runner(detector.variant, model, x, y, "cpu", logdir)
        try:
            runner.run(FAULT_STEP + 2)
        except RuntimeError as e:
            if not detector.stops:
                raise
            error = str(e)
        finally:
            runner.close()
    found = detector.answer(runner, error, caught)
    found["verdict"] = _judge(fault, sites[fault], found)
    return found


def run_faults(models, schedule: Schedule, timing: list[dict] | None = None) -> list[dict]:
    """Every fault on every model under every detector (a fresh seeded model each time), plus
    each detector's per-step cost on that model: from ``timing`` (this run's timing results)
    when it holds the model, else measured in-line here."""
    timed = {r.get("model"): timed_rows(r) for r in timing or []}
    with one_thread(), tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp_s:
        return [_fault_entry(name, schedule, timed.get(name), Path(tmp_s)) for name in models]


def _fault_entry(name: str, schedule: Schedule, timed: dict | None, tmp: Path) -> dict:
    t0 = time.perf_counter()
    entry: dict = {"model": name, "cells": {}}
    try:
        _, _, _, sites, entry["desc"] = fault_model(name)
        entry["expected"] = {f: _expected(f, sites[f]) for f in FAULTS}
        for fault in FAULTS:
            for key, detector in FAULT_DETECTORS.items():
                try:
                    found = detect(name, fault, detector, tmp / f"{name}-{fault}-{key}")
                except Exception as e:  # noqa: BLE001 - one cell failing must not stop the table
                    found = {"said": f"error: {type(e).__name__}: {e}"[:160], "verdict": "error"}
                entry["cells"][f"{fault}/{key}"] = found
        entry["cost"] = fault_costs(name, schedule, timed, tmp)
    except Exception:  # noqa: BLE001
        entry["error"] = failure()
    entry["elapsed_s"] = time.perf_counter() - t0
    log(f"faults {name}: {entry['elapsed_s']:.1f} s")
    return entry


def fault_costs(name: str, schedule: Schedule, timed: dict | None, tmp: Path | None) -> dict:
    """detector -> {"ratio", "source"}: this run's timing table (``timed``: variant key -> row)
    when it timed ``name``, else a short interleaved measurement of the detectors' variants on
    the (unplanted) fault model."""
    variants_of = {key: d.variant for key, d in FAULT_DETECTORS.items()}
    if timed and all(v in timed for v in variants_of.values()):
        return {key: {"ratio": timed[v]["ratio"], "source": "timing table"} for key, v in variants_of.items()}
    steps, rounds = FAULT_MODELS[name].quick_cost if schedule.quick else FAULT_MODELS[name].cost
    keys = ["bare", *variants_of.values()]
    variants = {k: {"status": "ok"} for k in keys}
    # A fresh (seeded, identical) model each, not a deepcopy: GPT-2's patched MLP forward is a
    # closure over its own modules, which a copy would keep calling.
    runners = {}
    for k in keys:
        model, x, y, _, _ = fault_model(name)
        runners[k] = Runner(k, model, x, y, "cpu", tmp / f"cost-{name}-{k}")
    try:
        interleave(runners, variants, {k: steps for k in keys}, rounds, warmup=2, schedule=schedule)
    finally:
        close_runners(runners.values())  # (in the caller's process, which goes on: a full close)
    rows = timed_rows({"variants": variants})
    source = f"in-line: {plural(rounds, 'round')} of {plural(steps, 'step')}, CPU, 1 thread"
    return {key: {"ratio": rows[v]["ratio"], "source": source} for key, v in variants_of.items() if v in rows}


FAULTS_METHOD = (
    "Each fault is planted at step {step} (counting from 0) of a fresh, seeded model trained with "
    "Adam for {steps} steps, once per detector: this project (`watch(model, writer, "
    'on_nonfinite="warn", summary=False, graph=False)`, its first `nonfinite` alert), '
    "`torch.autograd.set_detect_anomaly(True, check_nan=True)` around each step (the backward "
    "function its RuntimeError names, and the innermost frame of the forward traceback it "
    "prints; judged right when that traceback runs through the planted code, since it names "
    "no module), and the naive hooks (`isfinite(t).all()` read on the host for every module "
    "output and output gradient; the first flagged). A module fault is planted inside the "
    "module's own forward, after its computation; the unwatched fault is a functional call in "
    "the parent's forward, between two modules. right: the planted module (for the unwatched "
    "fault: both modules it lies between, or its parent) at the planted step; wrong: another "
    "module or step; missed: nothing reported."
)


def faults_section(entries: list[dict], timing: list[dict] | None = None) -> str:
    """The markdown of the fault table: one table per model, a cost row under each."""
    lines = [
        "## Which detector finds which fault",
        "",
        FAULTS_METHOD.format(step=FAULT_STEP, steps=FAULT_STEP + 2),
        "",
    ]
    for entry in entries:
        lines += _model_fault_table(entry)
    lines += _timed_costs_table(timing)
    return "\n".join(lines)


def _model_fault_table(e: dict) -> list[str]:
    lines = [f"### {e['model']}: {e.get('desc', '')}", ""]
    if e.get("error"):
        return lines + ["**Failed:**", "", "```", e["error"].strip()[-2000:], "```", ""]
    lines += [
        "| fault | planted at | " + " | ".join(d.label for d in FAULT_DETECTORS.values()) + " |",
        "| --- | --- |" + " --- |" * len(FAULT_DETECTORS),
    ]
    for fault, spec in FAULTS.items():
        cells = [e["cells"].get(f"{fault}/{d}", {}) for d in FAULT_DETECTORS]
        said = " | ".join(f"{c.get('said', '—')}: **{c.get('verdict', '—')}**" for c in cells)
        lines.append(f"| {spec.label} | {e['expected'][fault]} | {said} |")
    cost = e.get("cost") or {}
    costs = " | ".join(
        f"{fmt_ratio(cost[d]['ratio'])} ({cost[d]['source']})" if d in cost else "—" for d in FAULT_DETECTORS
    )
    return lines + [f"| cost per step (ratio to bare) | | {costs} |", ""]


def _timed_costs_table(timing: list[dict] | None) -> list[str]:
    """Each detector's cost in this run's timing tables, one column per timed model."""
    timed = [(r.get("model"), timed_rows(r)) for r in timing or []]
    timed = [(m, rows) for m, rows in timed if rows]
    if not timed:
        return []
    lines = [
        "Per-step cost of each detector in this run's timing tables (ratio to bare; this project "
        "at its default cadence):",
        "",
        "| detector | " + " | ".join(m for m, _ in timed) + " |",
        "| --- |" + " ---: |" * len(timed),
    ]
    for d in FAULT_DETECTORS.values():
        ratios = " | ".join(fmt_ratio(rows[d.variant]["ratio"]) if d.variant in rows else "—" for _, rows in timed)
        lines.append(f"| {d.label} | {ratios} |")
    return lines + [""]

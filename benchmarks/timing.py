"""Timing: rounds of interleaved chunks, and the medians of per-round ratios to bare.

This VM is noisy: only interleaved, same-process comparisons over several rounds resolve a few
per cent. Every variant is warmed up, then in each of R rounds trains a chunk of K steps, in a
new random order; a chunk's time includes ``writer.flush()`` (the writer thread's work belongs
to the variant that queued it). Reported: the median per-step time over rounds, and the median
over rounds of each round's ratio to (and difference from) bare training in the same round.
Also here: the one-time cost of ``summary``/``graph``, the statistics pass against memory
bandwidth, and host syncs per step on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.isolation import error_line, failure, log, quiet
from benchmarks.models import train_loss
from benchmarks.variants import VARIANTS, Runner

__all__ = [
    "FULL",
    "QUICK",
    "SYNC_WARNING",
    "Schedule",
    "chunk_steps",
    "count_host_syncs",
    "interleave",
    "logging_step_tensors",
    "median_time",
    "stats_pass_vs_bandwidth",
    "summarize",
    "time_one_off",
    "timed_rows",
]


@dataclass(frozen=True)
class Schedule:
    """How long and how carefully a run measures: the full run, or ``--quick``'s smoke run."""

    quick: bool
    rounds: int
    settle_s: float  # pause before each timed chunk, outside its time
    lead_in_steps: int  # untimed steps right before each timed chunk
    mem_steps: int  # steps of the memory process; step 0 is a logging step for all but log_freq=100
    align: bool  # chunks a multiple of the variant's logging cadence (see chunk_steps)
    one_off_reps: int
    stats_pass_reps: int


FULL = Schedule(
    quick=False, rounds=5, settle_s=0.2, lead_in_steps=1, mem_steps=10, align=True, one_off_reps=3, stats_pass_reps=10
)
QUICK = Schedule(
    quick=True, rounds=3, settle_s=0.05, lead_in_steps=0, mem_steps=1, align=False, one_off_reps=1, stats_pass_reps=3
)


def chunk_steps(steps: int, cadence: int | None, align: bool) -> int:
    """Steps per chunk for a variant logging every ``cadence`` steps. Aligned (a full run), a
    multiple of the cadence, at least ``steps``: every chunk then holds the same number of its
    logging steps. Unaligned (``--quick``), sparse cadences show their off-cadence cost only."""
    if align and cadence and cadence > 1:
        return cadence * -(-steps // cadence)
    return steps


def interleave(runners: dict, variants: dict, chunk: dict, rounds: int, warmup: int, schedule: Schedule) -> None:
    """Warm every runner up, then ``rounds`` rounds in which each trains ``chunk[key]`` steps, in
    a new random order per round; each chunk's per-step time is appended to
    ``variants[key]["per_step_s"]``. A runner that raises is dropped (its variant says why)."""
    for key in list(runners):
        variants[key].setdefault("per_step_s", [])
        try:
            _timed_chunk(runners[key], warmup, schedule)
        except Exception:  # noqa: BLE001
            _drop(runners, variants, key)
    rng = random.Random(20261123)
    for r in range(rounds):
        order = list(runners)
        rng.shuffle(order)
        for key in order:
            if key not in runners:
                continue
            try:
                variants[key]["per_step_s"].append(_timed_chunk(runners[key], chunk[key], schedule) / chunk[key])
                _keep_step_times(runners[key], variants[key])
            except Exception:  # noqa: BLE001
                _drop(runners, variants, key)
        times = ", ".join(
            f"{k} {variants[k]['per_step_s'][-1] * 1e3:.3g}" for k in runners if variants[k].get("per_step_s")
        )
        log(f"round {r + 1}/{rounds}: {times} ms/step")


def _keep_step_times(runner: Runner, variant: dict) -> None:
    """The chunk's median logging step, median other step, and median step right after a
    logging step that does not log itself (seconds; CPU), appended per round to ``log_step_s`` /
    ``off_step_s`` / ``after_log_s`` (None where the chunk had no such step). ``watch`` closes a
    logging step (its statistics pass, judging and write) at the next step's start: off a
    cadence of 1 that close is in the step after it."""
    times = runner.step_times
    runner.step_times = []
    after = [t for (before, _), (flag, t) in zip(times, times[1:]) if before and not flag]
    for key, picked in (
        ("log_step_s", [t for flag, t in times if flag]),
        ("off_step_s", [t for flag, t in times if not flag]),
        ("after_log_s", after),
    ):
        variant.setdefault(key, []).append(statistics.median(picked) if picked else None)


def _timed_chunk(runner: Runner, steps: int, schedule: Schedule) -> float:
    # Let threads left busy by the previous chunk (OpenBLAS workers spin ~0.1 s after numpy's
    # histogram code; wandb's service process) go idle first: their work belongs to the variant
    # that started it, not to the next one.
    time.sleep(schedule.settle_s)
    # Untimed lead-in steps (flushed) so each timed chunk starts warm. Any K consecutive steps
    # hold K/c steps of cadence c, so alignment is kept.
    with quiet():
        runner.run(schedule.lead_in_steps)
    runner.step_times = []  # the chunk's own steps only
    t0 = time.perf_counter()
    with quiet():
        runner.run(steps)
    return time.perf_counter() - t0


def _drop(runners: dict, variants: dict, key: str) -> None:
    variants[key]["status"] = "error"
    variants[key]["error"] = failure()
    runner = runners.pop(key)
    with contextlib.suppress(Exception):
        runner.close()
    log(f"{key} failed and was dropped:\n{variants[key]['error']}")


def summarize(result: dict) -> list[dict]:
    """Rows of a model's table: ms/step, paired ratios and differences to bare, memory."""
    variants = result.get("variants", {})
    bare = variants.get("bare", {})
    mem_key = "cuda_mb" if result.get("device") == "cuda" else "rss_mb"
    rows = []
    for key, variant in VARIANTS.items():
        v = variants.get(key, {"status": "not run"})
        label = variant.label
        if key == "watch_default" and "default_every" in result:
            label = f"watch(), default cadence (every={result['default_every']})"
        row = {"key": key, "label": label, "status": v.get("status", "not run"), "chunk": v.get("chunk")}
        row.update(_paired_times(v, bare))
        if row["status"] == "ok" and "ratio" not in row:
            row["status"] = "no timing"
        row.update(_paired_memory(v.get("mem") or {}, bare.get("mem") or {}, mem_key))
        if v.get("error"):
            row["error"] = error_line(v["error"], 160)
        if v.get("syncs"):
            row["syncs"] = v["syncs"]
        rows.append(row)
    return rows


def _paired_times(variant: dict, bare: dict) -> dict:
    """The medians over rounds: ms/step, and the ratio to (and difference from) the same round's bare."""
    times = variant.get("per_step_s") or []
    bare_t = bare.get("per_step_s") or []
    if variant.get("status", "not run") != "ok" or not times or not bare_t:
        return {}
    ratios = [t / b for t, b in zip(times, bare_t)]
    out = {
        "ms": statistics.median(times) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_lo": min(ratios),
        "ratio_hi": max(ratios),
        "added_s": statistics.median([t - b for t, b in zip(times, bare_t)]),
    }
    # A logging step's own cost: the round's median logging step over the same round's median
    # bare step (CPU, where steps are timed one by one; the chunk's closing flush is not in it),
    # with its close: what the step after it took over the variant's own other steps.
    rounds = zip(
        variant.get("log_step_s") or [],
        variant.get("after_log_s") or [],
        variant.get("off_step_s") or [],
        bare.get("off_step_s") or [],
    )
    logged = [
        (t + (after - off if after is not None and off is not None else 0.0), b)
        for t, after, off, b in rounds
        if t is not None and b is not None
    ]
    if logged:
        out["log_added_s"] = statistics.median([t - b for t, b in logged])
        out["log_ratio"] = statistics.median([t / b for t, b in logged])
    return out


def _paired_memory(mem: dict, bare_mem: dict, mem_key: str) -> dict:
    if mem_key in mem and mem_key in bare_mem:
        return {
            "mem_mb": mem[mem_key],
            "mem_ratio": mem[mem_key] / bare_mem[mem_key],
            "mem_added_mb": mem[mem_key] - bare_mem[mem_key],
        }
    if "error" in mem:
        return {"mem_error": error_line(mem["error"], 120)}
    return {}


def timed_rows(result: dict) -> dict[str, dict]:
    """variant key -> its summary row, for the variants that have a ratio to bare."""
    return {row["key"]: row for row in summarize(result) if row.get("ratio")}


def median_time(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up (synchronized on CUDA)."""
    import torch

    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_one_off(base, x, y, device: str, tmp: Path, reps: int) -> dict:
    """One-time cost of summary=True, graph=True: the first batch under watch with both on minus
    the same with both off (both: fresh model copy, watch entered and left, writer flushed).
    A first uncounted run with both off pays the process's first-time costs (imports, the
    grad-flow figure's first draw); then the best of ``reps`` runs of each."""
    best: dict[str, float] = {}
    caught: list[str] = []
    plan = [("warm-up", False)] + [
        (label, flags) for _ in range(reps) for label, flags in (("on", True), ("off", False))
    ]
    for i, (label, flags) in enumerate(plan):
        runner = Runner("bare", copy.deepcopy(base), x, y, device, tmp / f"oneoff-{i}-{label}")
        elapsed, messages = _first_batch_under_watch(runner, flags)
        if flags:
            caught += messages
        runner.close()
        if label != "warm-up":
            best[label] = min(best.get(label, float("inf")), elapsed)
    return {
        "on_s": best["on"],
        "off_s": best["off"],
        "added_s": best["on"] - best["off"],
        "warnings": sorted(set(caught))[:3],
    }


def _first_batch_under_watch(runner: Runner, summary_and_graph: bool) -> tuple[float, list[str]]:
    """Seconds for one step of a fresh ``runner`` under watch (entered, left, flushed), and the
    warnings it raised."""
    from introspect import watch

    flags = summary_and_graph
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with quiet():
            with watch(runner.model, runner.writer, every=10**9, check_every=0, summary=flags, graph=flags):
                runner.run(1)
        runner.writer.flush()
        elapsed = time.perf_counter() - t0
    return elapsed, [f"{w.category.__name__}: {w.message}" for w in ws]


def logging_step_tensors(model, x, y) -> list:
    """What a logging step of ``watch(every=1)`` takes statistics of: every watched module's
    output and the gradient w.r.t. it, every watched parameter and its gradient (one training
    step's forward and backward; the tensors are detached copies, kept for timing)."""
    from introspect.runtime.selection import select_modules, select_parameters
    from introspect.runtime.tensors import named_float_tensors

    modules = select_modules(model)
    params = select_parameters(model, modules)
    found: list = []

    def hook(module, args, output):
        for _, t in named_float_tensors(output):
            found.append(t.detach().clone())
            if t.requires_grad:
                t.register_hook(lambda g: found.append(g.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        train_loss(model, x, y).backward()
    finally:
        for h in handles:
            h.remove()
    found += [p.detach().clone() for p in params.values()]
    found += [p.grad.detach().clone() for p in params.values() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return [t for t in found if t.numel() > 0]


def stats_pass_vs_bandwidth(model, x, y, device: str, reps: int = 10, probe_mb: int = 256) -> dict:
    """The statistics pass of one logging step against reading its tensors once.

    The pass: ``RecordBatch.add`` of every tensor a logging step histograms, ``compute`` and the
    one transfer to the host, as ``watch`` does it. The yardstick: the bytes of those tensors over
    the device's read bandwidth, measured here by summing a ``probe_mb`` buffer. Issue target on
    GPU: the pass within 3x of the yardstick.
    """
    import torch

    from introspect.records.stats import RecordBatch

    tensors = logging_step_tensors(model, x, y)
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def statistics_pass():
        batch = RecordBatch()
        for t in tensors:
            batch.add(t)
        batch.compute().cpu()

    pass_s = median_time(statistics_pass, device, reps)
    probe = torch.ones(probe_mb * 2**20 // 4, device=device)
    read_s = median_time(lambda: probe.sum(), device, reps)
    bandwidth = probe.numel() * 4 / read_s
    probe = None  # the buffer goes before the numbers are returned
    once_s = n_bytes / bandwidth
    return {
        "tensors": len(tensors),
        "bytes": n_bytes,
        "pass_s": pass_s,
        "bandwidth_bps": bandwidth,
        "read_once_s": once_s,
        "ratio": pass_s / once_s,
    }


SYNC_WARNING = "called a synchronizing CUDA operation"
"""The text of the warning ``torch.cuda.set_sync_debug_mode("warn")`` raises (c10's
``warn_or_error_on_sync``, a ``TORCH_WARN``: once per synchronizing call, never deduplicated)."""


def count_host_syncs(runner: Runner, cadence: int | None, samples: int = 3) -> dict:
    """Host syncs per step of one CUDA variant, off its logging cadence and on it (median over
    ``samples`` steps of each kind; one logging step for a sparse cadence): the warnings
    ``torch.cuda.set_sync_debug_mode("warn")`` raises while the runner trains one step at a time.
    CUDA only (the mode needs a CUDA context).

    ``warnings.catch_warnings`` is process-wide on this Python, so warnings raised in the autograd
    engine's device thread (hooks that read a gradient on the host) are counted too; those a C++
    backward function raises there are replayed on this thread when ``backward()`` returns.
    """
    import torch

    want = {"off": 0 if cadence == 1 else samples, "logging": 0 if not cadence else samples if cadence == 1 else 1}
    counts: dict[str, list[int]] = {"off": [], "logging": []}
    torch.cuda.synchronize()  # what earlier steps queued is not this count's
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(samples + (cadence or 0) + 1):  # enough steps to reach both kinds
            kind = "logging" if runner.variant.logs_at(runner.step_no, cadence) else "off"
            with warnings.catch_warnings(record=True) as caught, quiet():
                warnings.simplefilter("always")
                runner.step()
            counts[kind].append(sum(SYNC_WARNING in str(w.message) for w in caught))
            if all(len(counts[k]) >= want[k] for k in counts):
                break
    finally:
        torch.cuda.set_sync_debug_mode("default")
    runner.writer.flush()
    torch.cuda.synchronize()
    return {k: statistics.median(v) if v else None for k, v in counts.items()}

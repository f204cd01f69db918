"""One model's measurements, in a process of its own: peak memory per variant, the interleaved
timing, host syncs on CUDA, the one-time cost of summary and graph, the statistics pass.

The result is a JSON-able dict (the report reads it): ``variants`` maps each variant key to its
``status``, ``mem``, ``chunk``, ``per_step_s`` (one per round), ``syncs`` and ``error``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.isolation import (
    call_forked,
    error_line,
    failure,
    in_fresh_process,
    installed_version,
    log,
    outcome,
    preimport,
    quiet,
    run_in_session,
)
from benchmarks.models import MODELS, build_model
from benchmarks.timing import (
    FULL,
    QUICK,
    Schedule,
    chunk_steps,
    count_host_syncs,
    interleave,
    stats_pass_vs_bandwidth,
    time_one_off,
)
from benchmarks.variants import VARIANTS, Runner, close_runners, variants_for, wandb_init

__all__ = ["Plan", "measure_memory", "memory_main", "run_model"]


@dataclass(frozen=True)
class Plan:
    """What one model's worker does: the options of the run, resolved for this model."""

    model: str
    device: str
    variant_keys: list[str]
    steps: int  # K
    warmup: int
    rounds: int
    timeout: float
    schedule: Schedule
    scale: bool = False
    """The scale axis: timing only (no memory, one-off or statistics-pass measurement)."""

    @classmethod
    def for_model(cls, args, model: str) -> Plan:
        schedule = QUICK if args.quick else FULL
        steps, warmup = MODELS[model].chunk(args.quick)
        scale = bool(getattr(args, "scale", False))
        return cls(
            model,
            args.device,
            args.variant_keys,
            args.steps or steps,
            warmup,
            args.rounds,
            args.timeout,
            schedule,
            scale,
        )


def run_model(plan: Plan) -> dict:
    """Run one model's worker in a process of its own (see ``isolation``); its results, or an
    error with its log's tail."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        status, tail = run_in_session(lambda: worker(plan, out), plan.model, plan.timeout, Path(tmp) / "stdout.log")
        elapsed = time.perf_counter() - t0
        result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("model", plan.model)
    result["elapsed_s"] = elapsed
    if status != 0 and "error" not in result:
        result["error"] = f"worker exited with status {status}\n" + "\n".join(tail)
    return result


def worker(plan: Plan, out: Path) -> int:
    """One model: memory per variant, then the interleaved timing; results as JSON in ``out``."""
    result: dict = {"model": plan.model, "device": plan.device, "variants": {}}
    try:
        _measure(plan, result)
        status = 0
    except BaseException:  # noqa: BLE001 - reported in the model's section
        result["error"] = failure(None)
        status = 1
    out.write_text(json.dumps(result, indent=1))
    return status


def _measure(plan: Plan, result: dict) -> None:
    import torch

    preimport([plan.model])  # already done when forked from the harness
    wandb_version = installed_version("wandb")
    statuses = variants_for(plan.model, plan.variant_keys, wandb_version)
    keys = [k for k, status in statuses.items() if status == "ok"]
    result.update(_run_facts(plan), wandb=wandb_version)
    result["variants"] = {key: {"status": status} for key, status in statuses.items()}

    phase = time.perf_counter()
    if not plan.scale:
        _measure_memory(plan, keys, result["variants"])  # no parallel torch op has run here yet
        log(f"memory: {time.perf_counter() - phase:.1f} s")

    from introspect.live import DEFAULT_EVERY

    result["default_every"] = DEFAULT_EVERY
    base, x, y, result["desc"] = build_model(plan.model, plan.device)
    result["params"] = sum(p.numel() for p in base.parameters())
    result["modules"] = len(list(base.modules()))
    result["scale"] = plan.scale
    if plan.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix=f"bench-{plan.model}-") as tmp_s:
        tmp = Path(tmp_s)
        phase = time.perf_counter()
        _measure_steps(plan, keys, result["variants"], (base, x, y), tmp)
        log(f"timing: {time.perf_counter() - phase:.1f} s")
        if plan.scale:
            return
        phase = time.perf_counter()
        result["one_off"] = _or_error(lambda: time_one_off(base, x, y, plan.device, tmp, plan.schedule.one_off_reps))
        log(f"summary+graph one-off: {time.perf_counter() - phase:.1f} s")
        result["stats_pass"] = _or_error(
            lambda: stats_pass_vs_bandwidth(copy.deepcopy(base), x, y, plan.device, plan.schedule.stats_pass_reps)
        )


def _run_facts(plan: Plan) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": plan.steps,
        "warmup": plan.warmup,
        "rounds": plan.rounds,
        "mem_steps": plan.schedule.mem_steps,
        "align": int(plan.schedule.align),
    }


def _or_error(measure) -> dict:
    """``measure()``, or {"error": ...}: the timings stand without it."""
    try:
        return measure()
    except Exception:  # noqa: BLE001
        return {"error": failure()}


def _measure_memory(plan: Plan, keys: list[str], variants: dict) -> None:
    """Peak memory of each variant, trained alone in a process of its own: a forked child on CPU,
    a fresh interpreter on CUDA."""
    timeout = max(60.0, plan.timeout / 4)
    steps = plan.schedule.mem_steps
    for key in keys:
        if plan.device == "cuda":
            args = ["--_mem", plan.model, "--_variant", key, "--device", plan.device, "--_mem-steps", str(steps)]
            mem = in_fresh_process(args, timeout)
        else:
            mem = call_forked(lambda k=key: measure_memory(plan.model, k, plan.device, steps), timeout)
        variants[key]["mem"] = mem = mem.get("ok", mem)
        if "error" in mem:
            log(f"memory {key}: failed: {error_line(mem['error'])}")
        else:
            log(f"memory {key}: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))


def _measure_steps(plan: Plan, keys: list[str], variants: dict, data: tuple, tmp: Path) -> None:
    """All variants side by side: interleaved timing, then (on CUDA) host syncs per step."""
    base, x, y = data
    wandb_run = None
    runners: dict[str, Runner] = {}
    try:
        for key in keys:
            try:
                if VARIANTS[key].needs_wandb and wandb_run is None:
                    wandb_run = wandb_init(tmp / "wandb")
                runners[key] = Runner(key, copy.deepcopy(base), x, y, plan.device, tmp / key, wandb_run)
            except Exception:  # noqa: BLE001 - one variant failing must not stop the others
                variants[key] = {"status": "error", "error": failure(), "mem": variants[key].get("mem")}
        if "bare" not in runners:
            raise RuntimeError("the bare variant could not be built")
        chunk = {key: chunk_steps(plan.steps, VARIANTS[key].cadence, plan.schedule.align) for key in runners}
        for key, k in chunk.items():
            variants[key]["chunk"] = k
        interleave(runners, variants, chunk, plan.rounds, plan.warmup, plan.schedule)
        if plan.device == "cuda":
            _count_syncs(runners, variants)
    finally:
        close_runners(runners.values(), finish_watch=False)  # the worker ends soon; the timing is done
        if wandb_run is not None:
            with contextlib.suppress(Exception), quiet():
                wandb_run.finish()


def _count_syncs(runners: dict, variants: dict) -> None:
    log("host syncs per step ...")
    for key, runner in runners.items():
        try:
            variants[key]["syncs"] = count_host_syncs(runner, VARIANTS[key].cadence)
        except Exception:  # noqa: BLE001 - the timings stand without it
            variants[key]["syncs"] = {"error": failure(3)}


def measure_memory(model_name: str, key: str, device: str, steps: int) -> dict:
    """Train only variant ``key`` for ``steps`` steps in this (fresh) process; its peak memory."""
    import torch

    with tempfile.TemporaryDirectory(prefix=f"bench-mem-{key}-") as tmp:
        model, x, y, _ = build_model(model_name, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = wandb_init(Path(tmp)) if VARIANTS[key].needs_wandb else None
        runner = Runner(key, model, x, y, device, Path(tmp) / "tb", run)
        with quiet():
            runner.run(steps)
        out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if device == "cuda":
            out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        runner.close(finish_watch=False)  # this process ends right after
        if run is not None:
            with quiet():
                run.finish()
    return out


def memory_main(args) -> None:
    """``--_mem``: the fresh process that measures one variant's memory (on CUDA); JSON out."""
    result = outcome(lambda: measure_memory(args._mem, args._variant, args.device, args._mem_steps))
    Path(args._json).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up that matters; skip the interpreter's teardown

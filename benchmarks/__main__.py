"""``python -m benchmarks`` (what ``scripts/bench`` runs): the options, then the run and its report."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from benchmarks.fault_table import (
    FAULTS,
    TABLE_MODELS,
    dated,
    fault_table_markdown,
    has_markers,
    run_fault_table,
    write_fault_table,
)
from benchmarks.faults import FAULT_MODELS, faults_section, run_faults
from benchmarks.isolation import REPO, failure, pin_env, preimport, resolve_device
from benchmarks.models import MODELS, SCALE_MODELS
from benchmarks.report import (
    QUICK_NOTE,
    RATIO_NOTE,
    header,
    loadavg,
    machine_info,
    method_text,
    model_section,
    write_plot,
    write_report_file,
)
from benchmarks.timing import FULL, QUICK
from benchmarks.variants import SCALE_VARIANTS, VARIANTS
from benchmarks.worker import Plan, memory_main, run_model

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
SCALE_OUT = REPO / "docs" / "benchmarks_scale.md"
BASE_MODELS = [name for name in MODELS if name not in SCALE_MODELS]
SCALE_ROUNDS = 7


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Per-step cost of introspect.watch() next to bare training, the TensorBoard "
        "tutorial way (add_histogram of every parameter), wandb.watch (when installed), detect_anomaly and "
        "naive isfinite hooks; then a table of which NaN/Inf detector names which planted fault.",
    )
    p.add_argument("--quick", action="store_true", help="few rounds and short chunks: a smoke run (< 2 min on 2 cores)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="default: cpu (cuda falls back to cpu when unavailable)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="markdown report; the plot is written beside it as .png (default: docs/benchmarks.md; "
        "with --faults, printed only unless --out is given)",
    )
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {','.join(MODELS)} (default {','.join(BASE_MODELS)}; with --scale "
        f"{','.join(SCALE_MODELS)}; the fault table runs on a five-layer CNN of its own, and on gpt2 when it is "
        "among them)",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help=f"the scale axis: MLP stacks of 51, 201 and 801 modules and an 8-layer Llama-style decoder, variants "
        f"{','.join(SCALE_VARIANTS)} (unless --variants), {SCALE_ROUNDS} rounds; per variant the ratio to bare, "
        f"the time added per step, a logging step's own cost and that per module (default --out "
        f"docs/{SCALE_OUT.name}; no fault table)",
    )
    faults = p.add_mutually_exclusive_group()
    faults.add_argument(
        "--faults",
        action="store_true",
        help="only the fault tables: 8 planted faults x 4 models x 2 cadences and healthy runs (what the debugger "
        "says, how late, in which place of its report), then which NaN/Inf detector names which planted fault, "
        "at what cost (measured in-line)",
    )
    faults.add_argument("--skip-faults", action="store_true", help="timing tables only, no fault table")
    p.add_argument(
        "--fault-models",
        default=None,
        help=f"with --faults: comma-separated subset of {','.join(TABLE_MODELS)} for the fault table "
        "(default: all; with --quick: cnn,gpt2)",
    )
    p.add_argument(
        "--fault-kinds",
        default=None,
        help=f"with --faults: comma-separated subset of {','.join(FAULTS)} (default: all; with --quick: four)",
    )
    p.add_argument("--json", default=None, help="with --faults: also write the fault table's numbers as JSON here")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per model (default {FULL.rounds}; {QUICK.rounds} with --quick)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per chunk, K (default per model)")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)} (bare is always run)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per model before its worker is killed (default 300 with --quick, 3600 otherwise)",
    )
    # The fresh process that measures one variant's memory on CUDA (see worker.memory_main).
    hidden = argparse.SUPPRESS
    p.add_argument("--_mem", help=hidden)
    p.add_argument("--_variant", help=hidden)
    p.add_argument("--_mem-steps", dest="_mem_steps", type=int, help=hidden)
    p.add_argument("--_json", help=hidden)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.scale and args.faults:
        p.error("--scale and --faults are separate runs")
    if args.models is None:
        args.models = ",".join(SCALE_MODELS if args.scale else BASE_MODELS)
    if args.variants is None:
        args.variants = ",".join(SCALE_VARIANTS if args.scale else VARIANTS)
    if args.scale:
        args.skip_faults = True
    if args.rounds is None:
        args.rounds = (QUICK if args.quick else FULL).rounds if not args.scale or args.quick else SCALE_ROUNDS
    if args.timeout is None:
        args.timeout = 300.0 if args.quick else 3600.0
    args.variant_keys = ["bare"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "bare"]
    unknown = [v for v in args.variant_keys if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        p.error("--rounds and --steps must be >= 1")
    args.table_models = _subset(p, args.fault_models, TABLE_MODELS, "--fault-models")
    args.table_faults = _subset(p, args.fault_kinds, FAULTS, "--fault-kinds")
    return args


def _subset(p: argparse.ArgumentParser, value: str | None, choices, option: str) -> list[str] | None:
    """The names a comma-separated option lists (None: not given), each one of ``choices``."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        p.error(f"{option}: unknown {unknown}; choose from {','.join(choices)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._mem:
        return memory_main(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        print(f"error: unknown model(s) {unknown}; choose from {','.join(MODELS)}", file=sys.stderr)
        return 2
    fault_models = [] if args.skip_faults else [m for m in FAULT_MODELS if m == "fault_cnn" or m in models]
    args.device, device_note = resolve_device("cpu" if args.faults else args.device)
    if device_note:
        print(f"warning: {device_note}", file=sys.stderr)
    schedule = QUICK if args.quick else FULL

    # What every worker needs, set and imported once here: each worker is forked from this process.
    pin_env()
    preimport(fault_models if args.faults else models)
    started = datetime.datetime.now().astimezone()
    load_before = loadavg()
    t0 = time.perf_counter()
    results = [] if args.faults else [_run_model(args, model) for model in models]
    table = None
    if args.faults:
        # The fault table of issue 25: planted faults x models x cadences, and healthy runs.
        print("== fault table (cpu) ...", file=sys.stderr, flush=True)
        table = run_fault_table(args.table_models, args.table_faults, quick=args.quick)
    fault_text, fault_entries = "", []
    if fault_models:
        # Last, in this process: no worker is forked after the torch ops these run.
        print(f"== faults ({', '.join(fault_models)}, cpu) ...", file=sys.stderr, flush=True)
        fault_entries = run_faults(fault_models, schedule, results)
        fault_text = faults_section(fault_entries, results)
    total = time.perf_counter() - t0

    command = " ".join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    lines = _opening(args, command, total, started, load_before, device_note)
    out = Path(args.out).absolute() if args.out else SCALE_OUT if args.scale else DEFAULT_OUT
    if args.faults:
        return _write_fault_table(args, lines, table, fault_entries, fault_text, out if args.out else None, total)
    _write_report(lines, results, fault_text, out, args.device, total)
    return 0


def _opening(args, command: str, total: float, started, load_before: str, device_note: str | None) -> list[str]:
    """The report's lines before the first table."""
    title = (
        "# Fault tables: what the debugger says about planted faults, and which NaN/Inf detector names which"
        if args.faults
        else "# Benchmarks, the scale axis: what `watch` costs as the module count grows"
        if args.scale
        else "# Benchmarks: what `watch` costs per training step"
    )
    lines = header(title, command, total, started, args.device, load_before)
    if device_note:
        lines += [f"Note: {device_note}", ""]
    if args.quick:
        lines += [QUICK_NOTE, ""]
    if not args.faults:
        lines += [f"Method: {method_text(QUICK if args.quick else FULL)}", "", RATIO_NOTE, ""]
    return lines


def _run_model(args, model: str) -> dict:
    print(f"== {model} ({args.device}) ...", file=sys.stderr, flush=True)
    try:
        return run_model(Plan.for_model(args, model))
    except Exception:  # noqa: BLE001 - the harness itself must not stop on one model
        return {"model": model, "error": failure(None)}


def _write_fault_table(
    args, lines: list[str], table: dict | None, entries: list[dict], fault_text: str, out: Path | None, total: float
) -> int:
    """``--faults``: the fault table and the detectors' table printed, and written only where
    ``--out`` asks: into a file that holds the fault-table markers (docs/benchmarks.md), the fault
    table replaces what is between them (the detectors' table is the full run's); any other file
    gets the whole report. ``--json``: the numbers of both."""
    table_md = fault_table_markdown(table) if table else ""
    print()
    print(table_md)
    print(fault_text)
    if table is not None and args.json:
        write_fault_table(dict(table, detectors=entries), "", None, Path(args.json).absolute())
    if out is not None:
        if table is not None and has_markers(out):
            doc_md = fault_table_markdown(table, heading="### Fault table: the numbers")
            where = f"{machine_info('cpu')}; load average (1 min) after the run {loadavg()}"
            write_fault_table(table, dated(doc_md, where), out, None)
        else:
            write_report_file(out, "\n".join(lines) + "\n" + table_md + "\n" + fault_text)
        print(f"Wrote {out} in {total:.0f} s.")
    return 0


def _write_report(lines: list[str], results: list[dict], fault_text: str, out: Path, device: str, total: float) -> None:
    """The report (a section per model, then the fault table) and its plot beside it."""
    png = out.with_suffix(".png")
    sections = [model_section(r, device) for r in results] + ([fault_text] if fault_text else [])
    plot_note = write_plot(results, png)
    plot_line = (
        f"Plot: ![ratio to bare per variant and model]({png.name})" if plot_note is None else f"Plot: {plot_note}."
    )
    write_report_file(out, "\n".join(lines) + "\n" + plot_line + "\n\n" + "\n".join(sections))
    print()
    print("\n".join(sections))
    print(f"Wrote {out}" + (f" and {png}" if plot_note is None else f" ({plot_note})") + f" in {total:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())

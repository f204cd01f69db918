"""The report: a markdown table per model, the header docs/benchmarks.md opens with, the plot.

Everything here reads the workers' JSON-able results (see ``worker``) and measures nothing.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from benchmarks.isolation import error_line, installed_version
from benchmarks.models import model_title
from benchmarks.timing import Schedule, summarize, timed_rows
from benchmarks.variants import VARIANTS

__all__ = [
    "fmt_added",
    "fmt_ratio",
    "header",
    "loadavg",
    "machine_info",
    "method_text",
    "model_section",
    "plural",
    "scale_table",
    "stats_pass_text",
    "write_plot",
]


GENERATED_BELOW = "<!-- scripts/bench writes everything below this line; the text above it is kept. -->"


def kept_head(out: Path) -> str:
    """The hand-written text above ``GENERATED_BELOW`` in an existing report (docs/benchmarks.md
    opens with the prose the README links to), marker included; "" when there is none."""
    if not out.is_file():
        return ""
    text = out.read_text()
    end = text.find(GENERATED_BELOW)
    return "" if end < 0 else text[: end + len(GENERATED_BELOW)] + "\n\n"


def write_report_file(out: Path, text: str) -> None:
    """Write a generated report below the kept hand-written head of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(kept_head(out) + text.rstrip() + "\n")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def fmt_added(seconds: float) -> str:
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:+.0f} µs"
    ms = seconds * 1e3
    return f"{ms:+.2f} ms" if abs(ms) < 10 else f"{ms:+.1f} ms" if abs(ms) < 100 else f"{ms:+.0f} ms"


def fmt_duration(seconds: float) -> str:
    """A positive duration, without fmt_added's sign."""
    return fmt_added(seconds).lstrip("+")


def stats_pass_text(sp: dict) -> str:
    if "error" in sp:
        return f"Statistics pass vs memory bandwidth: failed ({error_line(sp['error'])})."
    size = f"{sp['bytes'] / 2**20:.1f} MB" if sp["bytes"] >= 2**20 else f"{sp['bytes'] / 2**10:.1f} KB"
    return (
        f"Statistics pass of one logging step ({sp['tensors']} tensors, {size}: every "
        f"watched output, output gradient, parameter and gradient; add + compute + one transfer): "
        f"{fmt_duration(sp['pass_s'])}; reading those bytes once at the measured read bandwidth "
        f"({sp['bandwidth_bps'] / 1e9:.0f} GB/s, a sum over a large buffer) takes "
        f"{fmt_duration(sp['read_once_s'])}: the pass costs {fmt_ratio(sp['ratio'])} one read "
        "(target on GPU: ≤ 3×; on small tensors per-op dispatch, not bandwidth, sets the time)."
    )


SYNCS_NOTE = (
    'Host syncs per step: the warnings `torch.cuda.set_sync_debug_mode("warn")` raised during '
    "one step, median over 3 steps off the variant's logging cadence / on it (one step for "
    "sparse cadences; — where the variant has no such step). Issue 15's target: at most one per "
    "step, and only with the non-finite check on."
)


def _fmt_syncs(syncs: dict | None) -> str:
    if not syncs:
        return "—"
    if "error" in syncs:
        return f"error: {error_line(syncs['error'], 80)}"
    return " / ".join("—" if syncs.get(k) is None else f"{syncs[k]:g}" for k in ("off", "logging"))


def _title(result: dict) -> str:
    return model_title(result.get("model", "?"), result.get("device"))


def model_section(result: dict, device: str) -> str:
    """One model's markdown: what it is and how it ran, its table, the one-off and statistics-pass lines."""
    lines = [f"## {_title(result)}", "", *_run_lines(result), ""]
    if result.get("error"):
        lines += ["**This model's run failed:**", "", "```", result["error"].strip()[-3000:], "```", ""]
    rows = summarize(result)
    if result.get("scale"):
        lines += scale_table(rows, result.get("modules") or 0)
    elif any(r.get("ms") is not None or r.get("mem_ratio") is not None for r in rows):
        lines += _variant_table(rows, device)
    one = result.get("one_off")
    if one:
        lines += [_one_off_line(one), ""]
    if result.get("stats_pass"):
        lines += [stats_pass_text(result["stats_pass"]), ""]
    return "\n".join(lines)


def _run_lines(result: dict) -> list[str]:
    lines = []
    if result.get("desc"):
        modules = f", {result['modules']:,} modules" if result.get("modules") else ""
        lines.append(f"{result['desc']}; {result.get('params', 0):,} parameters{modules}.")
    steps = result.get("steps")
    if steps:
        longer = sorted(
            {v["chunk"] for v in result.get("variants", {}).values() if v.get("chunk") and v["chunk"] != steps}
        )
        extra = f" ({', '.join(map(str, longer))} for variants whose cadence needs it)" if longer else ""
        lines.append(
            f"Chunks of {plural(steps, 'step')}{extra}, {plural(result.get('rounds', 0), 'round')}, "
            f"{plural(result.get('warmup', 0), 'warm-up step')} per variant; "
            f"the worker took {result.get('elapsed_s', 0):.0f} s."
        )
    return lines


def _variant_table(rows: list[dict], device: str) -> list[str]:
    mem_head = "peak GPU memory ratio" if device == "cuda" else "peak memory ratio (RSS)"
    syncs = device == "cuda"  # counted on CUDA only (set_sync_debug_mode needs a CUDA context)
    lines = [
        f"| variant | ms/step (median) | ratio to bare (min–max over rounds) | added per step | {mem_head} |"
        + (" host syncs per step (off-cadence / logging) |" if syncs else ""),
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if syncs else ""),
    ]
    for r in rows:
        if r["status"] == "not run":  # left out with --variants
            continue
        cells = [r["label"], *_time_cells(r), _memory_cell(r)] + ([_fmt_syncs(r.get("syncs"))] if syncs else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if syncs:
        lines += [SYNCS_NOTE, ""]
    return lines


SCALE_HEAD = (
    "| variant | ms/step (median) | ratio to bare (min–max over rounds) | added per step "
    "| logging step: added | per module |"
)


def scale_table(rows: list[dict], modules: int) -> list[str]:
    """The scale axis's table: per variant its ratio to bare, the time it adds per step, what one
    of its logging steps adds over a bare step, and that cost per module of the model."""
    lines = [SCALE_HEAD, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["status"] == "not run":
            continue
        log_cells = ["—", "—"]
        if r.get("log_added_s") is not None and r["key"] != "bare":
            per_module = r["log_added_s"] / modules * 1e6 if modules else float("nan")
            log_cells = [f"{fmt_added(r['log_added_s'])} ({r['log_ratio']:.1f}× a bare step)", f"{per_module:.0f} µs"]
        lines.append("| " + " | ".join([r["label"], *_time_cells(r), *log_cells]) + " |")
    lines.append("")
    return lines


def _time_cells(r: dict) -> list[str]:
    """ms/step, ratio to bare, added per step."""
    if r.get("ms") is None:
        return [r["status"] if r["status"] != "error" else f"error: {r.get('error', '')}", "—", "—"]
    if r["key"] == "bare":
        return [fmt_ms(r["ms"]), "1.00×", "—"]
    ratio = f"{fmt_ratio(r['ratio'])} ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f})"
    return [fmt_ms(r["ms"]), ratio, fmt_added(r["added_s"])]


def _memory_cell(r: dict) -> str:
    if r.get("mem_ratio") is not None:
        added = "" if r["key"] == "bare" else f", {r['mem_added_mb']:+.0f} MB"
        return f"{r['mem_ratio']:.2f}× ({r['mem_mb']:.0f} MB{added})"
    if r.get("mem_error"):
        return f"error: {r['mem_error']}"
    return "—"


def _one_off_line(one: dict) -> str:
    if "error" in one:
        return f"One-time cost of summary=True, graph=True: failed ({error_line(one['error'])})."
    note = f" Warnings: {'; '.join(one['warnings'])}." if one.get("warnings") else ""
    return (
        f"One-time cost of summary=True, graph=True on the first batch: {fmt_added(one['added_s'])} "
        f"(first batch under watch {one['on_s'] * 1e3:.0f} ms with both, {one['off_s'] * 1e3:.0f} ms "
        f"without; not part of the per-step numbers above).{note}"
    )


def machine_info(device: str) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count()
    with contextlib.suppress(AttributeError):
        usable = len(os.sched_getaffinity(0))
        if usable != cores:
            cores = f"{cores} ({usable} usable)"
    versions = ", ".join(
        f"{pkg} {installed_version(pkg) or 'not installed'}" for pkg in ("torch", "torchvision", "tensorboard", "wandb")
    )
    return (
        f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"{versions}; device: {device}"
    )


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def method_text(schedule: Schedule) -> str:
    """The method, in four sentences, as this run applied it."""
    chunks = (
        "K a multiple of the variant's logging cadence, so every chunk holds the same number of logging steps"
        if schedule.align
        else "chunks are not aligned to logging cadences in --quick"
    )
    lead = schedule.lead_in_steps
    lead_in = (
        ", and an untimed lead-in step warms the variant up again"
        if lead == 1
        else f", and {lead} untimed lead-in steps warm the variant up again"
        if lead
        else ""
    )
    return (
        "Each model runs in a process of its own (forked from the harness, which has imported torch "
        "but run nothing) that builds every variant side by side (own model copy, Adam optimizer and "
        "SummaryWriter; synthetic data made once), warms each up, then runs R "
        f"rounds in which every variant trains a chunk of K steps in a new random order ({chunks}). A "
        "chunk's time includes `writer.flush()` at its end, since the writer thread's work belongs to "
        f"the variant that queued it; an untimed {schedule.settle_s:g} s pause before each chunk lets threads the "
        f"previous one left spinning go idle{lead_in}. Reported: each variant's median ms/step over rounds, "
        "and the median over rounds of its ratio to (and difference from) the bare loop of the same "
        "round, which cancels most of the machine's drift; `watch` runs with `summary=False, "
        "graph=False` (their one-time cost has its own line), wandb offline, committing its hooks' "
        "histograms on the steps they log. Peak memory comes from a separate short process per variant "
        "that trains only that variant for a few steps (on CPU a forked child, peak RSS from "
        "`ru_maxrss`, which includes the interpreter and libraries; on CUDA a fresh process and "
        "`torch.cuda.max_memory_allocated`), relative to bare."
    )


def header(title: str, command: str, total_s: float, started, device: str, load_before: str) -> list[str]:
    """The lines every report opens with: what ran, when, where, and how busy the machine was."""
    return [
        title,
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Command: `{command}` ({total_s:.0f} s in all).",
        "",
        f"Machine: {machine_info(device)}. Load average (1 min) before the run {load_before}, "
        f"after it {loadavg()}: other work on the machine makes every number noisier.",
        "",
    ]


QUICK_NOTE = (
    "**A `--quick` run**: few rounds of short chunks, chunks not aligned to the "
    "logging cadence (sparse cadences show their off-cadence cost only). Rough "
    "numbers for checking the script, not for quoting."
)

RATIO_NOTE = (
    "Ratio: time per step over the bare loop's in the same round (median over rounds; "
    "range in brackets). Added per step: the difference, median over rounds."
)

# Alternatives in warm colours, watch in greens and blues, wandb in purples.
COLORS = {
    "tb_every1": "#d62728",
    "tb_every100": "#ff9896",
    "watch_default": "#2ca02c",
    "watch_every1": "#1f77b4",
    "watch_check": "#98df8a",
    "watch_hooks": "#aec7e8",
    "wandb_1": "#9467bd",
    "wandb_100": "#c5b0d5",
    "detect_anomaly": "#8c564b",
    "isfinite_hooks": "#e377c2",  # the other NaN detectors: browns/pinks
}


def write_plot(results: list[dict], path: Path) -> str | None:
    """A bar per variant and model: its ratio to bare. None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib failed ({e})"
    table = {res.get("model", "?"): timed_rows(res) for res in results}
    labels = {res.get("model", "?"): _title(res) for res in results}
    keys = [k for k in VARIANTS if k != "bare" and any(k in rows for rows in table.values())]
    models = [m for m, rows in table.items() if rows]
    if not keys or not models:
        return "no plot: no timings"
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(models) + 3), 5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j, m in enumerate(models) if key in table[m]]
        ys = [table[m][key]["ratio"] for m in models if key in table[m]]
        label = next(table[m][key]["label"] for m in models if key in table[m])
        ax.bar(xs, ys, width * 0.95, label=label, color=COLORS.get(key, "tab:gray"))
        _annotate_bars(ax, xs, ys)
    _ratio_axis(ax, [table[m][k]["ratio"] for m in models for k in keys if k in table[m]])
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([labels.get(m, m) for m in models])
    ax.set_ylabel("time per step / bare loop (median of rounds)")
    ax.set_title("Per-step cost of logging, relative to the bare training loop")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _annotate_bars(ax, xs: list[float], ys: list[float]) -> None:
    for xv, yv in zip(xs, ys):
        ax.annotate(
            f"{yv:.2f}" if yv < 10 else f"{yv:.1f}",
            (xv, yv),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=6,
            rotation=90,
        )


def _ratio_axis(ax, ratios: list[float]) -> None:
    """A line at 1×, ticks as ratios; a log scale when the ratios span more than 5×."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.axhline(1.0, color="black", linewidth=0.8)
    if max(ratios) / max(min(ratios), 1e-9) > 5:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.margins(y=0.12)

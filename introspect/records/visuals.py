"""Pictures for TensorBoard: image grids (torchvision's ``make_grid``) and matplotlib figures,
drawn without pyplot (no global backend switch in the user's process)."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import IntrospectError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "save_png",
    "grad_flow_image",
    "channel_grid",
    "heatmap",
    "displayable",
    "image_grid",
    "labeled_samples_image",
    "class_balance_image",
    "health_map_image",
    "divergence_image",
]


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """An HWC uint8 picture as a PNG file; a path that cannot be written is one ``IntrospectError``."""
    from PIL import Image

    try:
        Image.fromarray(image).save(path, format="PNG")
    except OSError as e:
        raise IntrospectError(f"cannot write {path}: {e}") from e


def _literal(text: str) -> str:
    """``text`` drawn as it is. Names come from files (class folders, module names, tags), and two
    ``$`` in one make matplotlib parse the text between them as TeX: a parse error failed the
    whole picture, and with it ``introspect data`` on a class folder named ``a$\\frac$``."""
    return str(text).replace("$", r"\$")


def _render(fig: Figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def grad_flow_image(layers: Sequence[str], rms: Sequence[float], max_abs: Sequence[float], step: int) -> np.ndarray:
    """The classic gradient-flow bar chart (max and RMS |grad| per layer, log scale) as HWC uint8.

    Layers run left to right from input to output, so a gradient that fades on its way back to the
    first layers shows as bars that shrink towards the left.
    """
    from matplotlib.figure import Figure

    n = len(layers)
    fig = Figure(figsize=(max(6.0, 0.35 * n + 2.0), 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    tiny = 1e-30
    ax.bar(x, np.maximum(np.asarray(max_abs, dtype=float), tiny), color="#4c9be8", alpha=0.55, label="max |grad|")
    ax.bar(x, np.maximum(np.asarray(rms, dtype=float), tiny), color="#1f3f73", alpha=0.9, label="rms |grad|")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([_literal(n) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.75, n - 0.25)
    ax.set_ylabel("gradient magnitude")
    ax.set_title(f"Gradient flow at step {step} (input → output)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _render(fig)


# --------------------------------------------------------------------------- images (CHW, [0, 1])
MIN_CELL = 32
"""Feature maps smaller than this (pixels, the larger side) are enlarged by an integer factor, so a
5x5 map is not a speck in TensorBoard."""


def channel_grid(fmap: torch.Tensor, max_channels: int = 64) -> torch.Tensor:
    """One sample's feature map (C, H, W) as a 3xH'xW' grid of its first ``max_channels`` channels.

    Each channel is min-max normalised on its own: channels differ in scale by orders of magnitude,
    and one shared scale would paint most of them black. A constant channel (a dead unit) stays
    black; NaN/Inf are drawn as 0.
    """
    from torchvision.utils import make_grid

    x = torch.nan_to_num(fmap[:max_channels].detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = x.flatten(1)
    lo = flat.amin(1)[:, None, None]
    span = (flat.amax(1)[:, None, None] - lo).clamp_min(1e-12)
    x = ((x - lo) / span).unsqueeze(1)  # (C, 1, H, W)
    x = _enlarge(x)
    nrow = math.ceil(math.sqrt(x.shape[0]))
    return make_grid(x, nrow=nrow, padding=1, pad_value=0.5)


def heatmap(matrix: torch.Tensor, max_size: int = 512) -> torch.Tensor:
    """A 2-D tensor (rows x columns, e.g. time x features) as a 3xHxW viridis image, scaled to its
    own min and max; at most ``max_size`` rows and columns (the first ones) are kept."""
    from matplotlib import colormaps

    x = torch.nan_to_num(matrix[:max_size, :max_size].detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    rgb = colormaps["viridis"](x.numpy())[..., :3]  # (H, W, 3) float in [0, 1]
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
    return _enlarge(image.unsqueeze(0))[0]


def _enlarge(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour enlargement of (N, C, H, W) images whose larger side is under MIN_CELL."""
    scale = MIN_CELL // max(x.shape[-2], x.shape[-1], 1)
    if scale <= 1:
        return x
    return x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def displayable(images: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) batch as float RGB in [0, 1], ready for ``make_grid`` or ``imshow``.

    Integer images are divided by 255; float images already in [0, 1] are shown as they are (so a
    dark image looks dark); any other float image (normalised, or 0-255) is scaled to its own min
    and max, so it is visible at all. One channel is repeated to grey, four lose alpha, any other
    count shows its first channel.
    """
    x = images.detach().cpu()
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    channels = x.shape[1]
    if channels == 4:
        x = x[:, :3]
    elif channels != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    flat = x.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    outside = (lo < 0) | (hi > 1)
    if bool(outside.any()):
        span = (hi - lo).clamp_min(1e-12)
        scaled = (x - lo[:, None, None, None]) / span[:, None, None, None]
        x = torch.where(outside[:, None, None, None], scaled, x)
    return x.clamp(0.0, 1.0)


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """A batch of images (N, C, H, W) as one 3xH'xW' grid, as ``torchvision.utils.make_grid`` draws it."""
    from torchvision.utils import make_grid

    return make_grid(displayable(images), nrow=nrow, padding=2, pad_value=1.0)


# --------------------------------------------------------------------------- figures (HWC uint8)
def labeled_samples_image(images: torch.Tensor, titles: Sequence[str], columns: int = 3) -> np.ndarray:
    """Up to nine images in a 3x3 matplotlib grid, each titled (e.g. ``label = 1 (automobile)``)."""
    from matplotlib.figure import Figure

    shown = displayable(images[: columns * columns])
    rows = max(1, math.ceil(len(shown) / columns))
    fig = Figure(figsize=(2.2 * columns, 2.3 * rows), dpi=100)
    for i, (image, title) in enumerate(zip(shown, titles)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(_literal(title), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _render(fig)


def class_balance_image(names: Sequence[str], counts: Sequence[int]) -> np.ndarray:
    """Samples per class as a bar chart, each bar labelled with its count."""
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(max(4.0, 0.5 * n + 2.0), 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    bars = ax.bar(x, counts, color="#4c9be8")
    ax.bar_label(bars, labels=[str(int(c)) for c in counts], fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [_literal(n) for n in names], rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8
    )
    ax.set_ylabel("samples")
    ax.set_title(f"Class balance ({sum(int(c) for c in counts)} samples)")
    ax.margins(y=0.12)
    fig.tight_layout()
    return _render(fig)


# --------------------------------------------------------------------------- whole-model pictures
_NOT_MEASURED = "#d9d9d9"
_ZERO_COLOUR = "black"
_FINDING_COLOUR = "#e41a1c"
_LINE = 0.13  # inches per line of 7-point text under a figure


def _tick_positions(n: int, most: int) -> list[int]:
    """Every k-th of ``n`` positions, k chosen so at most ``most`` (plus the last) are labelled."""
    stride = max(1, math.ceil(n / most))
    ticks = list(range(0, n, stride))
    if n and ticks[-1] != n - 1 and n - 1 - ticks[-1] >= stride / 2:
        ticks.append(n - 1)
    return ticks


def health_map_image(
    rows: Sequence[str],
    steps: Sequence[int],
    values: np.ndarray,
    marks: Sequence[tuple[int, int, Any]],
    title: str,
    unit: str,
    cmap: str = "viridis",
    limits: tuple[float, float] | None = None,
    zero_colour: bool = False,
    findings: Sequence[Any] = (),
    note: str = "",
) -> np.ndarray:
    """Modules (rows, in execution order) x logging steps (columns) coloured by one statistic.

    ``values`` holds the drawn numbers (NaN: not measured, grey; with ``zero_colour``, -inf: an
    exact zero of a log-scaled statistic, black). ``marks`` are ``(row, column, finding)`` cells
    outlined in red; ``findings`` are listed under the map (at most eight).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    n_rows, n_cols = values.shape
    # The layout is computed here, in inches, rather than by tight_layout: measuring every label
    # to place them was half the cost of a picture (~0.35 s), and one is drawn per statistic.
    font = 7 if n_rows > 30 else 8
    longest = max((len(r) for r in rows), default=4)
    left = min(0.6 * font / 72 * longest, 3.5) + 0.45  # the names, and the axis label beside them
    right, top = 1.25, 0.4  # the colour bar and its label; the title
    width = min(max(6.5, left + right + 0.16 * n_cols), 16.0)
    row_height = 0.2 if n_rows <= 40 else 0.14
    listed = list(findings)[:8]
    lines = [_literal(f"step {a.step}: {a.kind}{f' ({a.phase})' if a.phase else ''} at {a.where}") for a in listed]
    if len(findings) > len(listed):
        lines.append(f"... and {len(findings) - len(listed)} more findings")
    lines += textwrap.wrap(note, width=int(width / 0.07)) if note else []
    bottom = 0.75 + 0.25 + _LINE * len(lines)  # step labels and axis label, the legend, the list
    height = min(bottom + top + max(1.8, row_height * n_rows), 40.0)
    fig = Figure(figsize=(width, height), dpi=100)
    box = (left / width, bottom / height, (width - left - right) / width, (height - top - bottom) / height)
    ax = fig.add_axes(box)
    bar_ax = fig.add_axes(((width - right + 0.15) / width, box[1], 0.15 / width, box[3]))
    finite = values[np.isfinite(values)]
    lo, hi = (
        limits if limits is not None else ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    )
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    base = colormaps[cmap]
    colours = base.with_extremes(bad=_NOT_MEASURED, under=_ZERO_COLOUR if zero_colour else base(0.0))
    shown = np.ma.masked_invalid(np.where(np.isneginf(values), lo - 1.0, values))
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=colours, vmin=lo, vmax=hi)
    bar = fig.colorbar(image, cax=bar_ax, extend="min" if zero_colour and np.isneginf(values).any() else "neither")
    bar.set_label(unit, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([_literal(r) for r in rows], fontsize=font)
    cols = _tick_positions(n_cols, 24)
    ax.set_xticks(cols)
    ax.set_xticklabels([str(steps[j]) for j in cols], fontsize=8, rotation=90 if n_cols > 8 else 0)
    ax.set_xlabel("logging step")
    ax.set_ylabel("module, in execution order", fontsize=8)
    ax.set_title(f"Health map: {title}", fontsize=10)
    for i, j, _ in marks:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=_FINDING_COLOUR, linewidth=1.8))
    handles = [Patch(facecolor=_NOT_MEASURED, label="not measured")]
    if zero_colour:
        handles.append(Patch(facecolor=_ZERO_COLOUR, label="exactly 0"))
    if marks:
        handles.append(Patch(fill=False, edgecolor=_FINDING_COLOUR, linewidth=1.8, label="finding"))
    fig.legend(
        handles=handles,
        loc="lower right",
        ncol=len(handles),
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(1.0, (_LINE * len(lines) + 0.05) / height),
    )
    if lines:
        fig.text(0.01, 0.08 / height, "\n".join(lines), fontsize=7, va="bottom", ha="left", family="monospace")
    return _render(fig)


def divergence_image(forward: Sequence[Any], backward: Sequence[Any], rtol: float) -> np.ndarray:
    """Per-module relative difference of two models (``ModuleDiff`` rows), log scale.

    Exactly equal outputs sit on the bottom line, the tolerance is a dashed line, and the first
    divergence is marked; a second panel shows the gradients when there are any.
    """
    from matplotlib.figure import Figure

    panels = [
        (p, d) for p, d in (("forward: module outputs", forward), ("backward: gradients w.r.t. outputs", backward)) if d
    ]
    n = max((len(d) for _, d in panels), default=1)
    fig = Figure(figsize=(min(max(6.5, 0.16 * n + 2.5), 18.0), 3.6 * max(len(panels), 1) + 0.6), dpi=100)
    for k, (title, diffs) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        rel = np.array([d.max_rel for d in diffs], dtype=float)
        positive = rel[np.isfinite(rel) & (rel > 0)]
        floor = min(float(positive.min()) / 10 if positive.size else rtol / 100, rtol / 100)
        top = max(float(positive.max()) * 10 if positive.size else rtol * 10, rtol * 10)
        drawn = np.where(np.isfinite(rel), np.maximum(rel, floor), top)
        x = np.arange(len(diffs))
        colours = ["#2ca02c" if d.exact else (_FINDING_COLOUR if d.diverged else "#ff7f0e") for d in diffs]
        ax.scatter(x, drawn, c=colours, s=18, zorder=3)
        ax.plot(x, drawn, color="#999999", linewidth=0.8, zorder=2)
        ax.axhline(rtol, color="#555555", linestyle="--", linewidth=1, label=f"rtol {rtol:g}")
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, top * 2)
        first = next((d for d in diffs if d.diverged), None)
        if first is not None:
            ax.axvline(first.index, color=_FINDING_COLOUR, linewidth=1.2)
            ax.annotate(
                _literal(f"first divergence: {first.module}"),
                (first.index, top),
                xytext=(4, -12),
                textcoords="offset points",
                fontsize=8,
                color=_FINDING_COLOUR,
            )
        ticks = _tick_positions(len(diffs), 60)
        ax.set_xticks(ticks)
        ax.set_xticklabels(
            [_literal(diffs[i].module) for i in ticks], rotation=70, ha="right", fontsize=6 if len(ticks) > 30 else 7
        )
        ax.set_xlim(-0.75, len(diffs) - 0.25)
        ax.set_ylabel("max |a-b| / max |a|", fontsize=8)
        ax.set_title(f"{title} (green: exactly equal, drawn at the bottom; red: beyond tolerance)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return _render(fig)

"""Pictures for TensorBoard: image grids (torchvision's ``make_grid``) and matplotlib figures,
drawn without pyplot (no global backend switch in the user's process)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "grad_flow_image",
    "channel_grid",
    "heatmap",
    "displayable",
    "image_grid",
    "labeled_samples_image",
    "class_balance_image",
]


def _render(fig: "object") -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def grad_flow_image(
    layers: Sequence[str], rms: Sequence[float], max_abs: Sequence[float], step: int
) -> np.ndarray:
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
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
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
        ax.set_title(title, fontsize=9)
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
    ax.set_xticklabels(names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(f"Class balance ({sum(int(c) for c in counts)} samples)")
    ax.margins(y=0.12)
    fig.tight_layout()
    return _render(fig)

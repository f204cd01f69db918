"""Pictures for TensorBoard, drawn without pyplot (no global backend switch in the user's process)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["grad_flow_image"]


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

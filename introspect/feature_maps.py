"""Feature maps for ``watch(log=[..., "feature_maps"])``: which modules get a picture, and the
first sample's slice of their output that the picture is drawn from.

A convolution's 4-D output (N, C, H, W) becomes a grid of the first sample's channels; a 1-D
convolution's (N, C, L) and the sequence output of a recurrent or attention layer (batch, time,
features) become a heat map. Only that one sample's slice is copied on an image step (at most 64
channels), and it is dropped once the step is written; the pictures are drawn then.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .visuals import channel_grid, heatmap

__all__ = ["MAX_CHANNELS", "Picked", "sample_picker", "draw"]

MAX_CHANNELS = 64
"""Channels drawn per feature-map grid; a 512-channel layer would make a 23x23 grid of specks."""

Picked = tuple[str, torch.Tensor]
"""``("grid", (C, H, W))`` or ``("heatmap", (rows, columns))``: one sample's slice, a copy."""

_GRID_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
_SEQUENCE_CONVS = (nn.Conv1d, nn.ConvTranspose1d)
_SEQUENCE_MODULES = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _batch_first(module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    return bool(getattr(module, "batch_first", False))


def sample_picker(module: nn.Module) -> Callable[[torch.Tensor], Picked | None] | None:
    """For a module that gets feature-map pictures, a function from its output (the sole tensor,
    or the first of a tuple) to the first sample's slice; None for every other module."""
    if isinstance(module, _GRID_CONVS):
        def grid(output: torch.Tensor) -> Picked | None:
            if output.dim() != 4 or output.shape[0] == 0:  # unbatched or empty: nothing to show
                return None
            return "grid", output[0, :MAX_CHANNELS].detach().clone()

        return grid
    if isinstance(module, _SEQUENCE_CONVS):
        def channels_by_length(output: torch.Tensor) -> Picked | None:
            if output.dim() != 3 or output.shape[0] == 0:
                return None
            return "heatmap", output[0].detach().clone()

        return channels_by_length
    if isinstance(module, _SEQUENCE_MODULES):
        batch_dim = 0 if _batch_first(module) else 1

        def time_by_features(output: torch.Tensor) -> Picked | None:
            if output.dim() != 3 or output.shape[batch_dim] == 0:
                return None
            return "heatmap", output.select(batch_dim, 0).detach().clone()

        return time_by_features
    return None


def draw(picked: Picked) -> torch.Tensor:
    """The picture (3xHxW float in [0, 1]) of a slice from :func:`sample_picker`."""
    kind, values = picked
    return channel_grid(values, MAX_CHANNELS) if kind == "grid" else heatmap(values)

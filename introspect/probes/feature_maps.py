"""``feature_maps/{module}``: the first sample's channels of convolution outputs as an image grid
(RNN, attention and 1-D convolution outputs as a heat map), on image steps (``image_every``).

Which modules get a picture, and the slice it is drawn from: a convolution's 4-D output (N, C, H, W)
becomes a grid of the first sample's channels; a 1-D convolution's (N, C, L) and the sequence output
of a recurrent or attention layer (batch, time, features) become a heat map. A recurrent layer fed a
``PackedSequence`` returns one too: its first sample (in the batch's own order) is taken out of the
packed rows, as long as that sample is. Only that one sample's slice is copied on an image step (at
most 64 channels), and it is dropped once the step is written; the pictures are drawn then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..records.step import HostStep
from ..records.tags import tag
from ..records.visuals import channel_grid, heatmap
from .base import Probe, ProbeContext, StepPlan

__all__ = ["FeatureMaps", "MAX_CHANNELS", "Picked", "sample_picker", "draw"]

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


def sample_picker(module: nn.Module) -> Callable[[Any], Picked | None] | None:
    """For a module that gets feature-map pictures, a function from its output to the first
    sample's slice; None for every other module.

    The function takes the module's whole output (a tensor, a ``PackedSequence``, or a tuple whose
    first element is one, as an LSTM's ``(output, (h, c))``) or that first tensor alone. Only the
    whole output can say where a packed batch's first sample is; its ``.data`` alone gets None.
    """
    pick = _tensor_picker(module)
    if pick is None:
        return None

    def picker(output: Any) -> Picked | None:
        first = output[0] if isinstance(output, tuple) and not isinstance(output, PackedSequence) and output else output
        if isinstance(first, PackedSequence) and isinstance(module, nn.RNNBase):
            return "heatmap", _first_packed_sample(first).detach().clone()
        return pick(first) if isinstance(first, torch.Tensor) else None

    return picker


def _first_packed_sample(packed: PackedSequence) -> torch.Tensor:
    """(its length, features): the batch's first sample's rows of a ``PackedSequence``.

    The rows are time-major: step t holds ``batch_sizes[t]`` samples, in order of decreasing length,
    and a sample at sorted position p is in every step whose size exceeds p.
    """
    position = 0 if packed.unsorted_indices is None else int(packed.unsorted_indices[0])
    sizes = packed.batch_sizes  # always on the CPU
    rows = (torch.cumsum(sizes, 0) - sizes)[sizes > position] + position
    return packed.data[rows.to(packed.data.device)]


def _tensor_picker(module: nn.Module) -> Callable[[torch.Tensor], Picked | None] | None:
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


class FeatureMaps(Probe):
    name = "feature_maps"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        draws = callable(getattr(ctx.writer.writer, "add_image", None))
        pickers = {n: sample_picker(m) for n, m in ctx.modules.items()} if draws else {}
        self.pickers = {n: p for n, p in pickers.items() if p is not None}
        self.maps: dict[str, Picked] = {}  # first sample's slice per output, until the step is written

    def active(self, plan: StepPlan) -> bool:
        return plan.images and bool(self.pickers)

    def select(self, name: str, module: nn.Module) -> bool:
        return name in self.pickers

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        budget = self.ctx.budget
        if budget is not None and not budget.watches(name):  # a large model: not in the tag budget
            return None
        pick = self.pickers[name]
        # The picture is of the sole tensor, or the first of several (an RNN's sequence, not its
        # state); the picker takes the whole output, so a PackedSequence is unpacked there.
        for where, suffix, _ in self.ctx.outputs(name, output):
            if suffix in ("", "0"):
                if where not in self.maps and (picked := pick(output)) is not None:
                    self.maps[where] = picked
                break
        return None

    def on_step_end(self, host: HostStep | None) -> None:
        """Draw and write the step's feature maps, then drop the slices they were drawn from."""
        maps, self.maps = self.maps, {}
        step = self.ctx.buffer.step if self.ctx.buffer is not None else self.ctx.clock.step
        for where, picked in maps.items():
            try:
                image = draw(picked)
            except Exception as e:
                self.ctx.disable(f"<feature_maps {where}>", None, e)
                continue
            full_tag = tag("feature_maps", where)
            if self.ctx.budget is None or self.ctx.budget.keeps(full_tag):
                self.ctx.writer.call("add_image", full_tag, image, step)

    def on_close(self, failed: bool) -> None:
        self.maps = {}

"""``feature_maps/{module}``: the first sample's channels of convolution outputs as an image grid
(RNN, attention and 1-D convolution outputs as a heat map), on image steps (``image_every``).
Only that sample's slice is copied, and dropped once the step's pictures are written."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..feature_maps import Picked, draw, sample_picker
from ..sinks import tag
from ..step import HostStep
from ..watch.clock import StepPlan
from ..watch.protocol import Probe

__all__ = ["FeatureMaps"]


class FeatureMaps(Probe):
    name = "feature_maps"
    builtin = True

    def bind(self, ctx) -> None:  # type: ignore[no-untyped-def]
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
            self.ctx.writer.call("add_image", tag("feature_maps", where), image, step)

    def on_close(self, failed: bool) -> None:
        self.maps = {}

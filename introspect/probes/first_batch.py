"""The torchinfo summary (printed, and ``model/summary``) and the graph, from the real first batch,
with training's state put back afterwards (see :mod:`introspect.summary`)."""

from __future__ import annotations

from torch import nn

from ..analysis.summary import model_summary, summary_markdown, write_graph
from ..errors import IntrospectWarning, warn
from ..records.tags import SUMMARY_TAG
from ..runtime.preserved import preserved_state
from .base import Probe

__all__ = ["FirstBatch"]


class FirstBatch(Probe):
    name = "first_batch"
    builtin = True

    def on_first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        writer = self.ctx.writer
        if not writer:
            return
        config = self.ctx.config
        if not (config.summary or config.graph):
            return
        # One copy of the parameters and buffers for the summary's and the graph's forwards together
        # (the preserved_state of each inside copies nothing again).
        with preserved_state(module):
            self._summary_and_graph(module, args, kwargs)

    def _summary_and_graph(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        writer, config = self.ctx.writer, self.ctx.config
        if config.summary:
            try:
                text = model_summary(module, args, kwargs)
            except Exception as e:
                warn(f"introspect: model summary skipped: {type(e).__name__}: {e}", IntrospectWarning)
            else:
                print(text)
                writer.call("add_text", SUMMARY_TAG, summary_markdown(text), 0)
        if config.graph and writer:
            writer.run(write_graph, module, args, kwargs, now=True)  # the trace runs the model: here

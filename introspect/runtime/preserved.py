"""Extra forwards that leave no trace: modes, buffers and RNG streams put back afterwards (the summary,
the graph, the replay and the CLI's inputs all run through ``preserved_state``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .._torch import tensor_version

__all__ = ["preserved_state", "cuda_devices"]


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices whose RNG the model's forward may draw from (its parameters' and buffers')."""
    return sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run side-effect-free forwards: restore modes, buffers and RNG streams afterwards.

    Only the buffers the forwards changed are written back: a write bumps a buffer's in-place
    version, and a forward between the real forward and its backward (the attention probe's
    eager rerun under torch.compile) must leave alone the buffers that forward saved for its
    backward (a rotary embedding's ``inv_freq``), or the backward refuses to run."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone(), tensor_version(b)) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=cuda_devices(model)), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved, version in buffers:
                # (a write through .data leaves the version as it was: the values say so then)
                if tensor_version(buffer) != version or not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        for module, mode in modes:
            module.training = mode

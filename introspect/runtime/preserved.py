"""Extra forwards that leave no trace: modes, buffers and RNG streams put back afterwards (the summary,
the graph, the replay and the CLI's inputs all run through ``preserved_state``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved_state", "cuda_devices"]


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices whose RNG the model's forward may draw from (its parameters' and buffers')."""
    return sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run side-effect-free forwards: restore modes, buffers and RNG streams afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=cuda_devices(model)), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, mode in modes:
            module.training = mode

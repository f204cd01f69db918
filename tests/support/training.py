"""Plain training loops and the bitwise comparisons that show watch() left training untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def train(
    model: nn.Module,
    make_input: Callable[[], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """A plain training loop; returns the detached losses. Batches come from the global RNG."""
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = make_input()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().clone())
        if after_step is not None:
            after_step(i)
    return losses


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Bitwise equal parameters and buffers (BatchNorm running stats included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def assert_same_losses(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"loss {i}: {x.item()!r} != {y.item()!r}"

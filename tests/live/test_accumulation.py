"""Gradient accumulation with ``optimizer=``: one step per ``optimizer.step()``, and ``grads/``
shows the accumulated gradient (the sum over the micro-batches) once per optimizer step."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from introspect import watch
from tests.support import QUIET
from tests.support.events import hist_at, hist_steps, read_events

MICRO = 3


def _batches(steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    return [
        [(torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)) for _ in range(MICRO)] for _ in range(steps)
    ]


def test_grads_histogram_is_the_sum_of_micro_batch_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    data = _batches(3)
    expected = []
    with watch(model, tmp_path / "run", every=1, optimizer=opt, **QUIET) as w:
        for k, micro in enumerate(data):
            # The twin: each micro-batch's gradient on its own, summed by hand in the same order.
            sums = None
            for x, y in micro:
                twin_opt.zero_grad()
                F.mse_loss(twin(x), y).backward()
                grads = [p.grad.clone() for p in twin.parameters()]
                sums = grads if sums is None else [a + b for a, b in zip(sums, grads)]
            expected.append(dict(zip([n for n, _ in twin.named_parameters()], sums)))
            for p, s in zip(twin.parameters(), sums):
                p.grad = s
            twin_opt.step()
            # The watched model: the usual accumulation loop.
            opt.zero_grad()
            for x, y in micro:
                F.mse_loss(model(x), y).backward()
                assert w.step == k  # forwards inside one optimizer step share its number
            opt.step()
    acc = read_events(tmp_path / "run")
    for k in range(3):
        for name, grad in expected[k].items():
            h = hist_at(acc, f"grads/{name}", k)  # once per optimizer step...
            assert h.num == grad.numel()
            # ...and it is the accumulated gradient, bit for bit.
            assert (h.min, h.max) == (grad.min().item(), grad.max().item()), (k, name)
            assert abs(h.sum - grad.double().sum().item()) <= 1e-6 * max(1.0, abs(h.sum))
            assert abs(h.sum_squares - (grad.double() ** 2).sum().item()) <= 1e-5 * h.sum_squares
        # Activations: the MICRO forwards of the step, merged.
        assert hist_at(acc, "activations/0", k).num == MICRO * 4 * 8
    assert hist_steps(acc, "grads/0.weight") == [0, 1, 2]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # and training is the twin's, bitwise

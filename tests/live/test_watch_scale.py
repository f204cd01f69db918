"""The cost of watching does not grow with the number of modules: the ops a step adds to bare
training, counted with torch.profiler on MLP stacks of 51 and 201 modules, are the same.

Counted: every ``aten::`` op the profiler records, less those that only make views (no kernel,
no pass over memory). Python hooks still run once per module on a logging step; what is counted
here is the tensor work.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import watch
from tests.support import QUIET

VIEW_OPS = frozenset(
    {
        "aten::view",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::detach",
        "aten::detach_",
        "aten::alias",
        "aten::as_strided",
        "aten::slice",
        "aten::narrow",
        "aten::split",
        "aten::split_with_sizes",
        "aten::contiguous",
        "aten::unbind",
        "aten::select",
        "aten::expand",
        "aten::t",
        "aten::transpose",
        "aten::squeeze",
        "aten::unsqueeze",
        "aten::flatten",
        "aten::lift_fresh",
        "aten::permute",
        "aten::_unsafe_view",
        "aten::view_as",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::result_type",
    }
)


def mlp(modules: int) -> nn.Sequential:
    """(modules - 1) / 2 blocks of (Linear 32->32, ReLU)."""
    layers: list[nn.Module] = []
    for _ in range((modules - 1) // 2):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers)


def added_ops(modules: int, tmp_path, every: int, logging: bool) -> collections.Counter:
    """Ops of one watched step (a logging one or not) less the ops of the same step unwatched."""
    counts = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = mlp(modules)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = torch.randn(8, 32), torch.randn(8, 32)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        w = watch(model, tmp_path / f"{modules}-{every}", every=every, **QUIET) if watched else None
        try:
            # Logging: step 0 (the first, which learns what it may hold uncopied), then step 1 is
            # measured. Off the cadence (every=4): steps 0-2, then step 3, whose start closes a step
            # that did not log either.
            for _ in range(1 if logging else 3):
                step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
                if w is not None:
                    w.close()  # the step's end (its one transfer) is part of it
        finally:
            if w is not None:
                w.close()
        counts.append(
            collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS)
        )
    bare, watched_ = counts
    return watched_ - bare


@pytest.mark.parametrize("logging", [True, False], ids=["logging step", "off the cadence"])
def test_ops_per_step_do_not_grow_with_the_module_count(tmp_path, logging):
    small = added_ops(51, tmp_path, every=1 if logging else 4, logging=logging)
    large = added_ops(201, tmp_path, every=1 if logging else 4, logging=logging)
    assert sum(small.values()) > 0
    # Four times the modules, the same tensor work (give or take a handful of ops).
    assert abs(sum(large.values()) - sum(small.values())) <= 8, (small, large)


def test_a_logging_step_adds_a_few_hundred_ops_and_an_off_step_a_few():
    """The numbers behind the test above, pinned loosely so a regression to per-module ops shows."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        logging = sum(added_ops(51, Path(d), every=1, logging=True).values())
        off = sum(added_ops(51, Path(d), every=4, logging=False).values())
    assert off < 40 < logging < 600, (off, logging)

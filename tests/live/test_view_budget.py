"""A view that scales: a model above ``max_modules`` writes per-module tags for a budget of
modules, stays under the tag ceiling, and keeps every module on the health map and in the block
roll-ups (records/budget.py); read back from the event files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from introspect import watch
from introspect.analysis.health_map_render import health_map_from_events
from introspect.records.budget import DEFAULT_MAX_MODULES, TAG_CEILING
from introspect.records.tags import HEALTH_DATA_TAG, health_map_tag, stored_text_tag
from tests.support.events import read_events

KINDS = ("scalars", "histograms", "images", "tensors")


def stack(pairs: int) -> nn.Sequential:
    """``pairs`` x (Linear 4->4, ReLU): 2 * pairs + 1 modules, the root included."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(pairs) for m in (nn.Linear(4, 4), nn.ReLU())])


def train(model: nn.Module, logdir, steps: int, **options) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    with watch(model, logdir, every=1, optimizer=opt, summary=False, graph=False, **options):
        for _ in range(steps):
            loss = model(torch.randn(4, 4, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def all_tags(logdir) -> dict[str, set[str]]:
    tags = read_events(logdir).Tags()
    return {kind: set(tags[kind]) for kind in KINDS}


@pytest.mark.slow  # 801 modules: ~25 s on the 2-core VM, most of it the health map's pictures at close
def test_an_801_module_model_stays_under_the_ceiling_with_every_module_on_the_map(tmp_path):
    model = stack(400)
    assert len(list(model.modules())) == 801
    train(model, tmp_path, steps=2)
    tags = all_tags(tmp_path)
    total = sum(len(t) for t in tags.values())
    assert total <= TAG_CEILING, total
    # Per-module histograms for a budget of modules (sample + findings), not for all 800.
    modules = {t.split("/", 1)[1] for t in tags["histograms"] if t.startswith("activations/")}
    assert 0 < len(modules) <= DEFAULT_MAX_MODULES
    assert {"0", "799"} <= modules  # the sample's first and last
    # Every module on the health map: live pictures, and its numbers for every module.
    assert health_map_tag("grad_rms") in tags["images"]
    assert stored_text_tag(HEALTH_DATA_TAG) in tags["tensors"]
    hm = health_map_from_events(tmp_path)
    watched = [str(i) for i in range(800)]
    assert hm.rows == watched and hm.steps == [0, 1]
    grad_rms = hm.matrix("grad_rms")  # (it fades to 0 through 400 ReLU layers: measured all the same)
    assert grad_rms.shape == (800, 2) and np.isfinite(grad_rms).all()
    # ... and in the block roll-ups: 800 indices grouped into 32 ranges of 25 modules.
    blocks = {t for t in tags["scalars"] if t.startswith("blocks/grad_rms/")}
    assert len(blocks) == 32 and "blocks/grad_rms/0-24" in blocks and "blocks/grad_rms/775-799" in blocks
    assert before_total(800) > 2 * total  # what the same run wrote without the budget (see below)


def before_total(modules: int) -> int:
    """Without a budget, the run above writes per Linear (400): activations, activation_grads,
    weights and grads of weight and bias, their grad_norm and update_ratio: 10 tags; per ReLU
    (400): 2 tags."""
    return modules // 2 * 10 + modules // 2 * 2


def test_max_modules_none_writes_every_module_and_small_models_are_unchanged(tmp_path):
    train(stack(30), tmp_path / "budget", steps=1, max_modules=10)
    train(stack(30), tmp_path / "all", steps=1, max_modules=None)
    budgeted, everything = all_tags(tmp_path / "budget"), all_tags(tmp_path / "all")
    per_module = {t for t in everything["histograms"] if t.startswith("activations/")}
    assert len(per_module) == 60
    assert len({t for t in budgeted["histograms"] if t.startswith("activations/")}) <= 10
    assert not {t for t in everything["scalars"] if t.startswith("blocks/")}  # no budget, no roll-ups
    assert stored_text_tag(HEALTH_DATA_TAG) not in everything["tensors"]
    # a model at or under the default budget writes what it always did
    train(stack(30), tmp_path / "default", steps=1)
    assert all_tags(tmp_path / "default")["histograms"] == everything["histograms"]


def test_an_explicit_include_is_written_in_full(tmp_path):
    train(stack(30), tmp_path, steps=1, max_modules=10, include=[nn.Linear])
    linears = {t for t in all_tags(tmp_path)["histograms"] if t.startswith("activations/")}
    assert len(linears) == 30

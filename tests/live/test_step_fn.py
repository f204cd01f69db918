"""step_fn=: the step follows an external counter (a trainer's global_step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from introspect import ConfigError, watch
from tests.support import QUIET
from tests.support.events import hist_steps, read_events
from tests.support.hooks import count_hooks, hook_state


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def __call__(self) -> int:
        return self.value


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _accumulating_loop(model, counter, steps, micro_batches, forward=None):
    """Gradient accumulation the way trainers do it: the counter moves after each optimizer step."""
    forward = forward or model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        for _ in range(micro_batches):
            loss = forward(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        counter.value += 1


def test_steps_are_the_counters_values_and_micro_batches_merge(logdir):
    model, counter = _mlp(), Counter(start=0)
    with watch(model, logdir, every=2, step_fn=counter, **QUIET) as w:
        _accumulating_loop(model, counter, steps=5, micro_batches=2)
        assert w.step == 4
    acc = read_events(logdir)
    assert hist_steps(acc, "weights/0.weight") == [0, 2, 4]
    # Two micro-batches of 8 rows each were merged into one histogram per step.
    assert [int(e.histogram_value.num) for e in acc.Histograms("activations/0")] == [128, 128, 128]


def test_first_step_always_logs_even_when_the_counter_does_not_start_at_zero(logdir):
    model, counter = _mlp(), Counter(start=101)  # a resumed run
    with watch(model, logdir, every=4, step_fn=counter, **QUIET):
        _accumulating_loop(model, counter, steps=6, micro_batches=1)
    assert hist_steps(read_events(logdir), "weights/0.weight") == [101, 104]


def test_children_called_without_the_root_still_count(logdir):
    """A LightningModule's training_step often calls its children, never the root's forward."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()

        def forward(self, x):  # never called
            raise AssertionError("the root is not called in this test")

    model, counter = Wrapper(), Counter()
    before = count_hooks(hook_state(model))
    with watch(model, logdir, every=1, step_fn=counter, **QUIET):
        _accumulating_loop(model, counter, steps=3, micro_batches=1, forward=model.body)
        with torch.no_grad():  # an evaluation pass is not a step
            model.body.eval()
            model.body(torch.randn(2, 4))
            model.body.train()
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/body.0") == [0, 1, 2]
    assert hist_steps(acc, "grads/body.0.weight") == [0, 1, 2]
    assert hist_steps(acc, "activation_grads/body.2") == [0, 1, 2]
    assert count_hooks(hook_state(model)) == before


def test_without_step_fn_children_alone_are_not_steps(logdir):
    model = _mlp()
    wrapper = nn.Sequential(model)
    with watch(wrapper, logdir, every=1, **QUIET) as w:
        model(torch.randn(2, 4)).sum().backward()
    assert w.step == 0 and not read_events(logdir).Tags()["histograms"]


@pytest.mark.parametrize(
    "step_fn, match",
    [
        (5, "must be a callable"),
        (lambda: "3", "integer step"),
        (lambda: 2.5, "integer step"),
        (lambda: -1, "got -1"),
    ],
    ids=["not_callable", "string", "float", "negative"],
)
def test_bad_step_fn_is_a_config_error(step_fn, match, logdir):
    model = _mlp()
    with pytest.raises(ConfigError, match=match):
        watch(model, logdir, step_fn=step_fn, **QUIET)
    watch(model, logdir, **QUIET).close()  # nothing was left attached


def test_step_fn_with_optimizer_numbers_steps_by_the_counter(logdir):
    model, counter = _mlp(), Counter(start=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, logdir, every=1, step_fn=counter, optimizer=opt, **QUIET):
        for _ in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            counter.value += 1
    acc = read_events(logdir)
    assert hist_steps(acc, "weights/0.weight") == [10, 11, 12]
    assert [e.step for e in acc.Scalars("update_ratio/0.weight")] == [10, 11, 12]

"""watch() and torch.compile, in either order: one clear warning, exact weights and gradients,
the step clock kept, no recompilation storm, hooks gone afterwards. (CPU inductor needs a C++
compiler; each test compiles a small MLP, a few seconds to a minute on a busy 2-core runner.)"""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import IntrospectWarning, watch
from introspect.runtime.compiled import COMPILED_WARNING
from tests.support import QUIET
from tests.support.events import hist_at, hist_steps, histogram_tags, read_events
from tests.support.hooks import hook_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
    ),
]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("order", ["compile-then-watch", "watch-then-compile", "module.compile()"])
def test_compiled_model_keeps_weights_grads_and_steps(tmp_path, order):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _mlp()
    twin = torch.compile(copy.deepcopy(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    before = hook_state(model, opt)
    seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntrospectWarning)
        if order == "compile-then-watch":
            run = torch.compile(model)
            w = watch(run, tmp_path / "run", every=1, optimizer=opt, **QUIET)
        else:
            w = watch(model, tmp_path / "run", every=1, optimizer=opt, **QUIET)
            if order == "watch-then-compile":
                run = torch.compile(model)
            else:
                model.compile()
                run = model
        with w:
            for step in range(3):
                x, y = torch.randn(5, 8), torch.randn(5, 4)
                seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
                loss = F.mse_loss(run(x), y)
                opt.zero_grad()
                loss.backward()
                seen[step] |= {f"grad:{n}": p.grad.clone() for n, p in model.named_parameters()}
                opt.step()
                assert w.step == step
                twin_loss = F.mse_loss(twin(x), y)
                opt_twin.zero_grad()
                twin_loss.backward()
                opt_twin.step()
                # Same numbers, to float rounding: the graph breaks at the forward's two ends
                # (our step clock) let inductor fuse the backward differently.
                torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-7)
    ours = [str(c.message) for c in caught if issubclass(c.category, IntrospectWarning)]
    assert ours == [COMPILED_WARNING]  # one clear warning, once
    assert hook_state(model, opt) == before
    assert counters["stats"]["unique_graphs"] <= 2  # no recompilation per step
    acc = read_events(tmp_path / "run")
    tags = histogram_tags(acc)
    assert not [t for t in tags if t.startswith(("activations/", "activation_grads/"))]  # never wrong data
    assert not [t for t in tags if "_orig_mod" in t]
    for name, _ in model.named_parameters():
        assert hist_steps(acc, f"weights/{name}") == [0, 1, 2]
        for step in range(3):
            h = hist_at(acc, f"weights/{name}", step)
            assert (h.min, h.max) == (seen[step][name].min().item(), seen[step][name].max().item())
            g = hist_at(acc, f"grads/{name}", step)
            grad = seen[step][f"grad:{name}"]
            assert (g.min, g.max) == (grad.min().item(), grad.max().item())
        assert len(acc.Scalars(f"update_ratio/{name}")) == 3


def test_compiled_model_without_optimizer_counts_forwards(tmp_path):
    """Forward steps: the root's hooks run outside the graph, so every compiled forward is a step."""
    model = _mlp()
    run = torch.compile(model)
    with pytest.warns(IntrospectWarning, match="torch.compile"):
        with watch(run, tmp_path / "run", every=2, **QUIET) as w:
            for step in range(5):
                F.mse_loss(run(torch.randn(5, 8)), torch.randn(5, 4)).backward()
                assert w.step == step
            with torch.no_grad():
                run(torch.randn(5, 8))  # not a step
            assert w.step == 4
    acc = read_events(tmp_path / "run")
    assert hist_steps(acc, "weights/0.weight") == [0, 2, 4]
    assert hist_steps(acc, "grads/0.weight") == [0, 2, 4]


def test_watch_after_compiled_warmup_and_run_on_after_close(tmp_path):
    """Dynamo does not guard on hooks: code compiled before watch() must still reach our hooks,
    and code compiled while watching must stop calling them after close()."""
    model = _mlp()
    run = torch.compile(model)
    F.mse_loss(run(torch.randn(5, 8)), torch.randn(5, 4)).backward()  # compiled without hooks
    before = hook_state(model)
    with pytest.warns(IntrospectWarning, match="torch.compile"):
        with watch(run, tmp_path / "run", every=1, **QUIET) as w:
            for _ in range(2):
                F.mse_loss(run(torch.randn(5, 8)), torch.randn(5, 4)).backward()
    assert w.step == 1
    assert hook_state(model) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the closed watcher sees nothing, writes nothing, says nothing
            F.mse_loss(run(torch.randn(5, 8)), torch.randn(5, 4)).backward()
    assert w.step == 1
    assert hist_steps(read_events(tmp_path / "run"), "weights/0.weight") == [0, 1]

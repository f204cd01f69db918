"""CUDA: host syncs only where the design allows them, checked with torch's sync debug mode.

Off the logging cadence a step must not sync the host at all: with ``check_every=0``, and with
the default check too, whose norms cross to pinned memory without blocking; under
``on_nonfinite="raise"`` the check reads synchronously (one sync per step) to raise before
``optimizer.step()``. Skipped without a GPU; the rest of
the CUDA coverage lives beside its feature (test_watch.test_cuda_model, test_stats's CUDA record,
test_amp's fp16 + GradScaler cases).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from introspect import NonFiniteError, watch
from tests.support import QUIET
from tests.support.events import hist_at, hist_steps, read_events
from tests.support.zoo import SeedCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup():
    torch.manual_seed(0)
    model = SeedCNN().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, foreach=True)
    batches = [(torch.randn(4, 3, 32, 32, device="cuda"), torch.randn(4, 1, device="cuda")) for _ in range(6)]
    return model, opt, batches


def _step(model, opt, batch) -> None:
    x, y = batch
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _syncs(model, opt, batch) -> int:
    """Host syncs during one training step, counted by torch's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(model, opt, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len([w for w in caught if "synchroniz" in str(w.message)])


def test_the_bare_loop_does_not_sync():
    """The reference: the training loop itself makes no host sync (else the counts below lie)."""
    model, opt, batches = _setup()
    _step(model, opt, batches[0])  # warm-up (lazy CUDA init, optimizer state)
    assert _syncs(model, opt, batches[1]) == 0


def test_no_host_sync_off_cadence_with_the_check_off(tmp_path):
    model, opt, batches = _setup()
    with watch(model, tmp_path / "run", every=5, check_every=0, **QUIET) as w:
        _step(model, opt, batches[0])  # step 0: a logging step...
        _step(model, opt, batches[1])  # ...whose records cross to the host at step 1's forward
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any sync raises
        try:
            for batch in batches[2:5]:  # steps 2-4: off the cadence
                _step(model, opt, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _step(model, opt, batches[5])  # step 5 logs again
    assert w.step == 5
    assert hist_steps(read_events(tmp_path / "run"), "activations/conv1") == [0, 5]


def test_no_host_sync_per_step_with_the_default_check(tmp_path):
    """The sentinel's norms go to pinned memory without blocking; the verdict is read once the
    copy has landed (by the next step at the latest): off the cadence a step never syncs."""
    model, opt, batches = _setup()
    with watch(model, tmp_path / "run", every=50, **QUIET) as w:
        _step(model, opt, batches[0])  # step 0 logs; its records cross at step 1's forward
        _step(model, opt, batches[1])
        counts = [_syncs(model, opt, batch) for batch in batches[2:6]]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any sync raises
        try:
            _step(model, opt, batches[2])
            _step(model, opt, batches[3])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert counts == [0, 0, 0, 0]
    assert w.step == 7 and w.alerts == []


def test_raise_reads_before_the_optimizer_step(tmp_path):
    """on_nonfinite="raise" keeps its promise, reading synchronously: one sync per step, and a
    NaN gradient raises before optimizer.step() spoils the weights."""
    model, opt, batches = _setup()
    with pytest.raises(NonFiniteError):
        with watch(model, tmp_path / "run", every=50, on_nonfinite="raise", **QUIET):
            _step(model, opt, batches[0])
            _step(model, opt, batches[1])
            counts = [_syncs(model, opt, batch) for batch in batches[2:5]]
            assert counts == [1, 1, 1]
            before = model.conv1.weight.detach().clone()
            x, y = batches[5]
            loss = F.mse_loss(model(x), y) * torch.tensor(float("nan"), device="cuda")
            opt.zero_grad()
            loss.backward()  # raises here, at the end of backward
            opt.step()
    assert torch.equal(model.conv1.weight.detach(), before)


def test_a_nan_is_still_reported_without_blocking(tmp_path):
    model, opt, batches = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, tmp_path / "run", every=50, **QUIET) as w:
            _step(model, opt, batches[0])
            with torch.no_grad():
                model.linear1.weight[0, 0] = float("nan")
            for batch in batches[1:4]:
                _step(model, opt, batch)
    assert any(a.kind == "nonfinite" for a in w.alerts)


def test_cuda_histograms_match_the_tensors(tmp_path):
    model, opt, batches = _setup()
    with watch(model, tmp_path / "run", every=1, **QUIET):
        _step(model, opt, batches[0])
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    acc = read_events(tmp_path / "run")
    for name, grad in grads.items():
        h = hist_at(acc, f"grads/{name}", 0)
        assert (h.min, h.max) == (grad.min().item(), grad.max().item())
        assert h.num == grad.numel()

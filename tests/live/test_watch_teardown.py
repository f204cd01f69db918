"""watch() teardown: every hook removed on every exit path (normal, mid-step, exceptions, SIGTERM),
close() idempotent, the model released, and the report of a clean run."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import (
    AlreadyWatchedError,
    watch,
)
from tests.support import QUIET
from tests.support.events import (
    hist_steps,
    read_events,
)
from tests.support.hooks import count_hooks, hook_state
from tests.support.training import make_optimizer, train
from tests.support.zoo import SeedCNN, seed_cnn_batch, seed_cnn_loss


# =========================================================================== teardown
def _check_hooks_attached(model, before, optimizer=None):
    during = hook_state(model, optimizer)
    assert count_hooks(during) > count_hooks(before), "watch attached no hooks"


def test_hooks_removed_after_normal_exit(seed_cnn, writer):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, **QUIET):
        _check_hooks_attached(seed_cnn, before)
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2, optimizer=opt)
    assert hook_state(seed_cnn, opt) == before


def test_hooks_removed_after_normal_exit_optimizer_mode(seed_cnn, writer):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, optimizer=opt, **QUIET):
        during = hook_state(seed_cnn, opt)
        assert during[("optimizer", "pre")] and during[("optimizer", "post")]
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2, optimizer=opt)
    assert hook_state(seed_cnn, opt) == before


def test_hooks_removed_mid_step(seed_cnn, writer):
    """Leaving between forward and backward of a logging step: the step's own hooks go too."""
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with watch(seed_cnn, writer, every=1, **QUIET):
        x, y = seed_cnn_batch()
        out = seed_cnn(x)
        assert any(getattr(p, "_post_accumulate_grad_hooks", None) for p in seed_cnn.parameters())
    assert hook_state(seed_cnn, opt) == before
    seed_cnn_loss(out, y).backward()  # the output-gradient hooks left on this graph are inert
    assert all(p.grad is not None for p in seed_cnn.parameters())


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
def test_hooks_removed_and_steps_on_disk_after_exception_in_block(seed_cnn, writer, logdir, exc_type):
    opt = make_optimizer(seed_cnn)
    before = hook_state(seed_cnn, opt)
    with pytest.raises(exc_type):
        with watch(seed_cnn, writer, every=1, optimizer=None, **QUIET):
            _check_hooks_attached(seed_cnn, before)
            train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 3, optimizer=opt)
            raise exc_type("stop")
    assert hook_state(seed_cnn, opt) == before
    # Every completed step is on disk.
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/conv1") == [0, 1, 2]
    assert hist_steps(acc, "grads/conv1.weight") == [0, 1, 2]
    # And the model can be watched again.
    with watch(seed_cnn, writer, every=1, **QUIET) as w2:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert w2.step == 0


class Boom(nn.Module):
    """Raises from inside the forward when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.exc: type[BaseException] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exc is not None:
            raise self.exc("boom")
        return x


def _boom_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), Boom(), nn.ReLU(), nn.Linear(8, 1))


def _vec_batch():
    return torch.randn(3, 4), torch.randn(3, 1)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["exception", "KeyboardInterrupt"])
def test_exception_inside_forward(writer, logdir, exc_type):
    model = _boom_model()
    opt = make_optimizer(model)
    before = hook_state(model, opt)
    with pytest.raises(exc_type):
        with watch(model, writer, every=1, **QUIET) as w:
            train(model, _vec_batch, F.mse_loss, 2, optimizer=opt)
            model[1].exc = exc_type
            try:
                model(torch.randn(3, 4))
            except exc_type:
                pass
            model[1].exc = None
            # Training goes on under the same watcher: the failed forward was step 2.
            train(model, _vec_batch, F.mse_loss, 1, optimizer=opt)
            assert w.step == 3
            model[1].exc = exc_type
            model(torch.randn(3, 4))
    assert hook_state(model, opt) == before
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/3") == [0, 1, 3]
    assert hist_steps(acc, "grads/3.weight") == [0, 1, 3]
    model[1].exc = None
    with watch(model, writer, every=1, **QUIET) as w2:
        train(model, _vec_batch, F.mse_loss, 2, optimizer=opt)
    assert w2.step == 1


def test_user_forward_hook_keeps_firing(seed_cnn, writer):
    calls = []
    handle = seed_cnn.conv1.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    with watch(seed_cnn, writer, every=1, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
        assert len(calls) == 2
    train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert len(calls) == 3
    assert handle.id in seed_cnn.conv1._forward_hooks
    handle.remove()
    assert not seed_cnn.conv1._forward_hooks


def test_close_is_idempotent_and_works_without_with(seed_cnn, writer, logdir):
    before = hook_state(seed_cnn)
    w = watch(seed_cnn, writer, every=1, **QUIET)
    _check_hooks_attached(seed_cnn, before)
    train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
    w.close()
    assert hook_state(seed_cnn) == before
    w.close()
    with w:  # entering a closed watcher and leaving it again is harmless
        pass
    assert hook_state(seed_cnn) == before
    assert hist_steps(read_events(logdir), "activations/conv1") == [0, 1]


def test_second_watch_is_an_error_until_the_first_closes(seed_cnn, writer):
    before = hook_state(seed_cnn)
    with watch(seed_cnn, writer, **QUIET):
        during = hook_state(seed_cnn)
        with pytest.raises(AlreadyWatchedError, match="already being watched"):
            watch(seed_cnn, writer, **QUIET)
        assert hook_state(seed_cnn) == during  # the refused watch attached nothing
        with pytest.raises(AlreadyWatchedError):
            watch(nn.DataParallel(seed_cnn), writer, **QUIET)  # the same model under a wrapper
    assert hook_state(seed_cnn) == before
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
    assert w.step == 0


def test_model_is_released_after_close(tmp_path):
    torch.manual_seed(0)
    model = SeedCNN()
    ref = weakref.ref(model)
    with watch(model, tmp_path / "run", every=1):  # summary and graph on: torchinfo caches models
        train(model, seed_cnn_batch, seed_cnn_loss, 1)
    del model
    gc.collect()
    assert ref() is None, "something still holds the model after the watch closed"


# =========================================================================== report
def test_report_without_findings(seed_cnn, writer):
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 3)
    assert w.alerts == []
    assert "no problems found in 3 steps" in w.report()


# =========================================================================== SIGTERM
SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from introspect import watch
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, sys.argv[1], every=1, summary=False, graph=False) as w:
        for i in range(4):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        print("ready", flush=True)  # steps 0-3 are complete
        time.sleep(60)  # SIGTERM arrives here
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_leaves_completed_steps_on_disk(tmp_path):
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(logdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # it did stop, and promptly
    steps = hist_steps(read_events(logdir), "activations/0")
    assert steps == [0, 1, 2, 3], steps

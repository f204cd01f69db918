"""Mixed precision: bf16/fp16 tensors histogrammed in float32, GradScaler overflow, fp16 overflow."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import ConfigError, NonFiniteWarning, watch
from tests.support import QUIET
from tests.support.events import hist_at, read_events

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (autocast and GradScaler on CUDA)")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _capture(model: nn.Module, name: str, seen: dict) -> list:
    """Our own hooks: the module's real output and the gradient w.r.t. it, per call."""
    module = dict(model.named_modules())[name]

    def hook(m, args, out):
        seen.setdefault("out", []).append(out.detach().clone())
        if out.requires_grad:
            out.register_hook(lambda g: seen.setdefault("grad", []).append(g.detach().clone()))

    return [module.register_forward_hook(hook)]


def _assert_hist_is(h, t: torch.Tensor) -> None:
    """Histogram fields against the tensor's float32 statistics (the same numbers, exactly)."""
    f = t.detach().float()
    assert h.num == f.numel()
    assert (h.min, h.max) == (f.min().item(), f.max().item())
    assert h.sum == pytest.approx(f.sum().item(), rel=1e-5, abs=1e-6)
    assert h.sum_squares == pytest.approx((f * f).sum().item(), rel=1e-5)
    assert sum(h.bucket) == f.numel()


@pytest.mark.parametrize(
    "device, dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=CUDA),
        pytest.param("cuda", torch.bfloat16, marks=CUDA),
    ],
    ids=["cpu-bf16", "cuda-fp16", "cuda-bf16"],
)
def test_autocast_activations_and_gradients_in_float32(tmp_path, device, dtype):
    model = _mlp().to(device)
    seen: dict = {}
    handles = _capture(model, "0", seen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one warning from our probes
        with watch(model, tmp_path / "run", every=1, **QUIET) as w:
            for _ in range(2):
                x, y = torch.randn(5, 6, device=device), torch.randn(5, 3, device=device)
                with torch.autocast(device, dtype=dtype):
                    out = model(x)
                loss = F.mse_loss(out.float(), y)
                opt.zero_grad()
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                opt.step()
    for h in handles:
        h.remove()
    assert seen["out"][1].dtype == dtype and seen["grad"][1].dtype == dtype  # really half precision
    assert w.alerts == []
    acc = read_events(tmp_path / "run")
    _assert_hist_is(hist_at(acc, "activations/0", 1), seen["out"][1])
    _assert_hist_is(hist_at(acc, "activation_grads/0", 1), seen["grad"][1])
    for name, grad in grads.items():  # float32 parameters: float32 gradients
        _assert_hist_is(hist_at(acc, f"grads/{name}", 1), grad)


class HalfBlowUp(nn.Module):
    """Computes in float16 and multiplies by 1e5 on the armed call: |x| > 65504 becomes Inf."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.half()
        return h * 1e5 if self.armed else h


def test_float16_forward_overflow_is_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), HalfBlowUp(), nn.Linear(8, 2).half())
    with pytest.warns(NonFiniteWarning, match="float16 overflow"):
        with watch(model, tmp_path / "run", every=1, **QUIET) as w:
            for step in range(3):
                model[1].armed = step == 1
                model(torch.randn(3, 4) * 10).float().sum().backward()
    [alert] = [a for a in w.alerts if a.kind == "nonfinite"]  # (the x1e5 also trips gradient health)
    assert (alert.where, alert.step, alert.phase) == ("1", 1, "forward")
    assert "Inf first appears in the output of 1 (HalfBlowUp)" in alert.message
    assert "float16 overflow: a value beyond ±65504" in alert.message
    assert alert.numbers["overflow_dtype_max"] == 65504
    acc = read_events(tmp_path / "run")
    assert hist_at(acc, "activations/1", 0).max < 65504  # a finite float16 histogram, in float32


def _scaler_run(tmp_path, device: str, dtype: torch.dtype, grad_scaler: bool, optimizer: bool):
    """Three steps with a GradScaler whose first scale is far too high: step 0's scaled gradients
    overflow in fp16 (the scaler skips it and backs off to 2**8), steps 1-2 are clean."""
    model = _mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40, backoff_factor=2.0**-32)
    true_grads = []
    options = dict(grad_scaler=scaler if grad_scaler else None, optimizer=opt if optimizer else None)
    with watch(model, tmp_path / "run", every=1, **options, **QUIET) as w:
        for _ in range(3):
            x, y = torch.randn(4, 6, device=device), torch.randn(4, 3, device=device)
            with torch.autocast(device, dtype=dtype):
                loss = F.mse_loss(model(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            true_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            scaler.step(opt)
            scaler.update()
    return w, true_grads, scaler


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("optimizer", [False, True], ids=["forward-steps", "optimizer-steps"])
def test_grad_scaler_overflow_is_not_a_nan_origin(tmp_path, device, optimizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NonFiniteWarning, nothing else either
        w, true_grads, scaler = _scaler_run(tmp_path, device, torch.float16, grad_scaler=True, optimizer=optimizer)
    assert scaler.get_scale() == 2.0**8
    [alert] = w.alerts
    assert (alert.kind, alert.step, alert.phase) == ("grad_overflow", 0, "backward")
    assert "GradScaler scale 1.09951e+12" in alert.message and "skips this optimizer step" in alert.message
    acc = read_events(tmp_path / "run")
    # Gradient histograms are the true (unscaled) gradients: the scale is a power of two, so
    # dividing by it is exact. (With optimizer=, the skipped step 0 is no optimizer step: its
    # forward and the next are one step, and steps 0 and 1 hold the gradients of calls 1 and 2.)
    last = 1 if optimizer else 2
    for name, grad in true_grads[2].items():
        h = hist_at(acc, f"grads/{name}", last)
        assert (h.min, h.max) == (grad.min().item(), grad.max().item()), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_without_grad_scaler_the_overflow_is_a_backward_origin(tmp_path, device):
    """The same run without grad_scaler=: the check cannot know the Infs are the scaler's."""
    with pytest.warns(NonFiniteWarning, match="gradient"):
        w, _, _ = _scaler_run(tmp_path, device, torch.float16, grad_scaler=False, optimizer=False)
    assert [(a.kind, a.phase, a.step) for a in w.alerts if a.kind == "nonfinite"] == [("nonfinite", "backward", 0)]


def test_grad_scaler_option_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="grad_scaler= must be a torch.amp.GradScaler"):
        watch(nn.Linear(2, 2), tmp_path / "run", grad_scaler=object())

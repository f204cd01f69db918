"""Mixed precision: float16/bfloat16 tensors, GradScaler's scaled gradients, float16 overflow.

>>> scaler = torch.amp.GradScaler("cuda")                        # doctest: +SKIP
>>> with watch(model, "runs/amp", optimizer=opt, grad_scaler=scaler) as w:
...     with torch.autocast("cuda", dtype=torch.float16):
...         loss = loss_fn(model(x), y)
...     opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()

Statistics of half-precision tensors are always taken in float32 (``stats.py``), and the
non-finite check sums them in float32, so a float16 activation of 60000 does not overflow the
check itself. Two things need the scaler:

* gradients in backward are the loss's gradients times the scale (65536 to start). The scaler
  starts high on purpose and backs off when a scaled gradient overflows to Inf: it skips that
  ``optimizer.step()`` and halves the scale. Such an Inf is routine, not a bug in the model, so
  with ``grad_scaler=`` a NaN/Inf found in backward becomes a ``grad_overflow`` finding (recorded
  once, no warning, never raised) instead of a non-finite origin. A forward NaN/Inf is still an
  origin: the forward is not scaled.
* gradient histograms show true gradients: scaled ones are divided by the scale on the device
  (the scale tensor is read without a host sync).

An Inf born in a float16 output is reported as what it almost always is, an overflow past
float16's largest value (65504).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._torch import grad_scaler_scale
from ..debugger.alerts import Alert
from ..errors import ConfigError

__all__ = ["LOW_PRECISION", "check_grad_scaler", "scale_tensor", "unscale", "scaler_overflow", "overflow_note"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_grad_scaler(scaler: Any) -> Any:
    if scaler is None:
        return None
    if not all(callable(getattr(scaler, m, None)) for m in ("scale", "get_scale", "is_enabled")):
        raise ConfigError(f"grad_scaler= must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler


def scale_tensor(scaler: Any) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor (no host sync), or None when not scaling."""
    if scaler is None or not scaler.is_enabled():
        return None
    return grad_scaler_scale(scaler)


def unscale(tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A scaled gradient back in the loss's units (float32, so the division cannot overflow)."""
    if scale is None:
        return tensor
    return tensor.detach().float() / scale.to(tensor.device)


def scaler_overflow(alert: Alert, scaler: Any) -> Alert:
    """A backward NaN/Inf under GradScaler, as the routine overflow it is."""
    try:
        scale = float(scaler.get_scale())  # a host sync, but only on this (firing) path
    except Exception:
        scale = float("nan")
    return dataclasses.replace(
        alert,
        kind="grad_overflow",
        message=(
            f"scaled gradients overflowed (GradScaler scale {scale:g}) at {alert.where}: the scaler "
            "skips this optimizer step and lowers its scale; a problem only if it repeats every step"
        ),
        numbers={**alert.numbers, "scale": scale},
    )


def overflow_note(alert: Alert, dtype: torch.dtype | None) -> Alert:
    """Name an Inf born in a half-precision forward output as the overflow it is."""
    if dtype not in LOW_PRECISION or alert.phase != "forward" or not alert.message.startswith("Inf"):
        return alert
    largest = torch.finfo(dtype).max
    name = str(dtype).replace("torch.", "")
    return dataclasses.replace(
        alert,
        message=alert.message
        + (
            f" — {name} overflow: a value beyond ±{largest:.6g} (keep this layer in float32 under "
            "autocast, or rescale its input)"
        ),
        numbers={**alert.numbers, "overflow_dtype_max": largest},
    )

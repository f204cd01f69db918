"""What the hooks capture from a module's output: every floating-point tensor, by a stable name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["named_float_tensors", "unit_health", "FINITE_PRESERVING"]

FINITE_PRESERVING = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardtanh",
    "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "Softsign", "Tanhshrink",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "Flatten", "Unflatten", "Identity", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d",
})
"""Parameter-free modules whose forward and backward map finite values to finite values (short of
float overflow): the non-finite check need not sum their outputs or the gradients they receive."""

_MAX_DEPTH = 8


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type != "meta"


def named_float_tensors(output: Any) -> list[tuple[str, torch.Tensor]]:
    """``[(suffix, tensor)]`` for every floating tensor in a module's output.

    Tuples and lists contribute their index, dicts (and ``ModelOutput``) their key, namedtuples
    their field name, nested as ``"1/0"``; a ``PackedSequence`` contributes its ``.data``. Integer,
    boolean, quantized and meta tensors, ``None`` and other objects are skipped quietly. When there
    is exactly one floating tensor its suffix is dropped by the caller, so a plain tensor output
    gets the module's own tag.
    """
    if isinstance(output, torch.Tensor):  # the common cases, without the walk
        return [("", output)] if _is_float_tensor(output) else []
    if type(output) is tuple and len(output) == 1 and isinstance(output[0], torch.Tensor):
        return [("0", output[0])] if _is_float_tensor(output[0]) else []
    found: list[tuple[str, torch.Tensor]] = []
    _walk(output, "", found, 0)
    return found


def _walk(obj: Any, path: str, found: list[tuple[str, torch.Tensor]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(obj, torch.Tensor):
        if _is_float_tensor(obj):
            found.append((path, obj))
        return
    if isinstance(obj, PackedSequence):
        _walk(obj.data, path, found, depth + 1)
        return
    if isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = list(zip(obj._fields, obj))
    elif isinstance(obj, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return
    for key, value in items:
        _walk(value, f"{path}/{key}" if path else key, found, depth + 1)


# --------------------------------------------------------------------------- unit health
# On logging steps only: one reduction over every dimension but the unit (channel) dimension 1.
UnitMeasure = Callable[[Any, str, torch.Tensor, Any, dict], None]


def _per_unit_max(values: torch.Tensor) -> torch.Tensor | None:
    if values.dim() < 2:
        return None
    dims = tuple(d for d in range(values.dim()) if d != 1)
    return values.amax(dim=dims)


def _measure_dead(buffer: Any, where: str, output: torch.Tensor, limits: Any, windows: dict) -> None:
    """Share of units (channels) that output zero for every sample of a window of logged batches.

    One small batch says little (a unit active on 5% of inputs is zero on all 8 samples of a batch
    two times in three), so the per-unit "never active" mask is ANDed over consecutive logging
    steps until it has seen ``dead_min_samples`` samples; only then is the share measured.
    """
    peak = _per_unit_max(output.detach())
    if peak is None:
        return
    dead_now = peak <= 0
    previous = windows.get(where)
    if previous is not None and previous[0].shape == dead_now.shape:
        dead, seen = previous[0] & dead_now, previous[1] + output.shape[0]
    else:
        dead, seen = dead_now, output.shape[0]
    if seen >= limits.dead_min_samples:
        buffer.add_measure(f"dead/{where}", dead.float().mean())
        windows.pop(where, None)
    else:
        windows[where] = (dead, seen)


def _measure_saturation(distance_to_bound: Callable[[torch.Tensor], torch.Tensor]) -> UnitMeasure:
    def measure(buffer: Any, where: str, output: torch.Tensor, limits: Any, windows: dict) -> None:
        """Share of output values within ``saturation_margin`` of a bound, where the slope is ~0."""
        near = distance_to_bound(output.detach().float()) < limits.saturation_margin
        buffer.add_measure(f"saturated/{where}", near.float().mean())

    return measure


_UNIT_MEASURES: dict[str, UnitMeasure] = {
    "ReLU": _measure_dead,
    "ReLU6": _measure_dead,
    "Sigmoid": _measure_saturation(lambda y: torch.minimum(y, 1.0 - y)),
    "Tanh": _measure_saturation(lambda y: 1.0 - y.abs()),
}


def unit_health(module_type: str) -> UnitMeasure | None:
    """The dead/saturated-unit measure for an activation module's type name, if it has one."""
    return _UNIT_MEASURES.get(module_type)

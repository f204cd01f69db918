"""What the hooks capture from a module's output: every floating-point tensor, by a stable name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError


def backward_target(output: Any, target: int | None) -> torch.Tensor:
    """The scalar to backpropagate: the sum of the output's first floating tensor, or of one unit."""
    tensors = named_float_tensors(output)
    if not tensors:
        raise ConfigError(
            f"cannot run a backward: the model's output ({type(output).__name__}) holds no floating tensor"
        )
    out = tensors[0][1]
    if not out.requires_grad:
        raise ConfigError("cannot run a backward: the model's output does not depend on anything that requires grad")
    if target is not None:
        units = out.shape[-1] if out.dim() else 0
        if not -units <= target < units:
            raise ConfigError(
                f"target {target} is out of range: the output's last dimension has {units} units "
                f"(shape {list(out.shape)})"
            )
        out = out.select(-1, target)
    return out.sum()


__all__ = ["named_float_tensors", "named_tensors"]

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
    _walk(output, "", found, 0, _is_float_tensor)
    return found


def named_tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``obj``, of any dtype but meta (token ids are graph edges too), named as
    :func:`named_float_tensors` names them."""
    found: list[tuple[str, torch.Tensor]] = []
    _walk(obj, "", found, 0, lambda t: t.device.type != "meta")
    return found


def _walk(
    obj: Any, path: str, found: list[tuple[str, torch.Tensor]], depth: int, keep: Callable[[torch.Tensor], bool]
) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(obj, torch.Tensor):
        if keep(obj):
            found.append((path, obj))
        return
    if isinstance(obj, PackedSequence):
        _walk(obj.data, path, found, depth + 1, keep)
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
        _walk(value, f"{path}/{key}" if path else key, found, depth + 1, keep)

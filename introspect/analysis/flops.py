"""True FLOPs per module, forward and backward, counted by ``torch.utils.flop_counter``.

>>> flops = count_flops(model, (x,))                       # doctest: +SKIP
>>> flops.forward["layers.0.mlp"], flops.total_backward    # doctest: +SKIP

torchinfo's "mult-adds" multiply a Linear's parameters by the batch size and ignore every other
dimension: on a transformer's (batch, tokens, features) activations it is short by the number of
tokens (a tiny Qwen2 on 2 x 16 tokens: 181,376 against 2.6 M multiply-adds in its Linear layers
alone). ``FlopCounterMode`` counts each matmul, convolution and attention kernel from its real
shapes (2 FLOPs per multiply-add: a Linear's forward is ``2 * batch * tokens * in * out``), in the
forward and in the backward, and attributes them to the modules running.

The count runs one forward and backward of the given inputs inside ``preserved_state`` (modes,
buffers and RNG put back) with gradients taken by ``torch.autograd.grad``, so no ``.grad`` changes:
training never sees it. Operations without a formula (elementwise, normalisation, softmax) count
zero, as in every FLOP counter; the matmuls dominate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..records.shards import user_type_name
from ..runtime.preserved import preserved_state
from ..runtime.selection import clean_name, root_name
from ..runtime.tensors import backward_target
from ..terminal import format_table

__all__ = ["FlopCount", "count_flops"]


@dataclass
class FlopCount:
    """FLOPs of one forward and its backward, per module (a module's count includes its children's)."""

    modules: list[str]
    types: dict[str, str]
    forward: dict[str, int]
    backward: dict[str, int]
    total_forward: int
    total_backward: int
    backward_run: bool = True
    """False when there was nothing to backpropagate (no parameter requires grad)."""

    @property
    def total(self) -> int:
        return self.total_forward + self.total_backward

    def table(self, depth: int = 3) -> str:
        """Modules down to ``depth`` that do any counted work, indented like torchinfo's table."""
        root = self.modules[0] if self.modules else "model"
        rows = []
        for name in self.modules:
            level = 0 if name == root else name.count(".") + 1
            if level > depth or not (self.forward.get(name) or self.backward.get(name)):
                continue
            rows.append(
                [
                    "  " * level + name,
                    self.types.get(name, ""),
                    f"{self.forward.get(name, 0):,}",
                    f"{self.backward.get(name, 0):,}" if self.backward_run else "-",
                ]
            )
        total = ["Total", "", f"{self.total_forward:,}", f"{self.total_backward:,}" if self.backward_run else "-"]
        headers = ["Module", "Type", "Forward FLOPs", "Backward FLOPs"]
        lines = format_table(headers, [*rows, total], right=[False, False, True, True]).splitlines()
        rule = "=" * max(len(line) for line in lines)
        title = (
            "FLOPs of one forward and backward of this batch (torch.utils.flop_counter; a module includes its children)"
        )
        return "\n".join([title, rule, lines[0], rule, *lines[1:-1], rule, lines[-1], rule])


def _cpu_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for SDPA's CPU kernel, which ``torch.utils.flop_counter`` (2.14) has none for:
    the same counts as its flash/efficient kernels get (``sdpa_flop_count``, GQA included)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    formulas: dict[Any, Any] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward),
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = formula
    return formulas


def _tracker_names(model: nn.Module) -> dict[str, str]:
    """``ModuleTracker``'s name of each module (the root's class name, then the path of
    ``named_children``) -> our tag name."""
    top = type(model).__name__
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        key = f"{top}.{name}" if name else top
        found.setdefault(key, clean_name(name) or root_name(model))
    return found


def count_flops(
    model: nn.Module, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, backward: bool = True
) -> FlopCount:
    """FLOPs of ``model`` on these inputs, forward and (with ``backward``) the backward of its
    output's sum (w.r.t. the trainable parameters and any input that requires grad, as
    ``loss.backward()`` would), per module; nothing of the model changes (see the module docstring).

    Raises the model's own errors untouched; ``ConfigError`` for a non-module.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise ConfigError(f"count_flops() expects an nn.Module, got {type(model).__name__}")
    names = _tracker_names(model)
    backward_run = False
    with preserved_state(model), torch.enable_grad():
        # What a training backward fills: the trainable parameters, and the inputs that require
        # grad, passed as views (``ModuleTracker`` cannot hook a leaf input under autograd.grad).
        inputs: list[torch.Tensor] = []

        def view(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
                inputs.append(value.view_as(value))
                return inputs[-1]
            return value

        args = [view(v) for v in args]
        kwargs = {k: view(v) for k, v in (kwargs or {}).items()}
        params = [p for p in model.parameters() if p.requires_grad] + inputs
        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
        with counter:
            output = model(*args, **kwargs)
            forward = {key: sum(per_op.values()) for key, per_op in counter.get_flop_counts().items()}
            if backward and params:
                try:
                    target = backward_target(output, None)
                except ConfigError:  # nothing that requires grad: a forward-only count
                    target = None
                del output
                if target is not None:
                    torch.autograd.grad(target, params, allow_unused=True)
                    backward_run = True
            else:
                del output
        both = {key: sum(per_op.values()) for key, per_op in counter.get_flop_counts().items()}
    per_forward: dict[str, int] = {}
    per_backward: dict[str, int] = {}
    for key, value in both.items():
        tag = names.get(key)
        if tag is None:
            continue
        per_forward[tag] = forward.get(key, 0)
        per_backward[tag] = value - forward.get(key, 0)
    total_forward = forward.get("Global", 0)
    total_both = both.get("Global", 0)
    modules = [clean_name(n) or root_name(model) for n, _ in model.named_modules()]
    return FlopCount(
        modules=list(dict.fromkeys(modules)),
        types={clean_name(n) or root_name(model): user_type_name(m) for n, m in model.named_modules()},
        forward=per_forward,
        backward=per_backward,
        total_forward=total_forward,
        total_backward=total_both - total_forward,
        backward_run=backward_run,
    )

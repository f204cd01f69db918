"""Every hook a model, its parameters, the optimizer and torch's globals hold: what watch() must leave
as it found it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODULE_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[Any, dict]:
    """Every hook the model, its parameters and the optimizer hold, as comparable dicts."""
    state: dict[Any, dict] = {}
    for name, module in model.named_modules():
        for attr in MODULE_HOOK_ATTRS:
            state[("module", name, attr)] = dict(getattr(module, attr, None) or {})
    for name, param in model.named_parameters():
        state[("param", name, "post_accumulate")] = dict(getattr(param, "_post_accumulate_grad_hooks", None) or {})
        state[("param", name, "backward")] = dict(param._backward_hooks or {})
    if optimizer is not None:
        state[("optimizer", "pre")] = dict(optimizer._optimizer_step_pre_hooks)
        state[("optimizer", "post")] = dict(optimizer._optimizer_step_post_hooks)
    from torch.nn.modules import module as module_mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        state[("global", attr)] = dict(getattr(module_mod, attr, None) or {})
    return state


def count_hooks(state: dict[Any, dict]) -> int:
    return sum(len(v) for v in state.values())

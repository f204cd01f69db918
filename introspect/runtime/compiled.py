"""Hooks under ``torch.compile``: what runs outside the graph, and what is skipped.

Dynamo traces module hooks into the compiled graph. Traced as they are, ours would be
recompiled on every step (they keep Python state: the step clock, buffers, weak references) and
hit the recompile limit, so a watched compiled model crawled. Instead:

* the root's pre/post hooks (the step clock; weights on logging steps) run eagerly, outside the
  graph: one graph break at each end of the forward, which costs microseconds;
* the per-module output hooks see ``torch.compiler.is_compiling()`` while dynamo traces them and
  return at once, so they add nothing to the graph: per-layer activations and activation
  gradients are unavailable for a compiled forward (one warning says so); the non-finite
  sentinel reads the model's outputs and gradients outside the graph and replays a bad step on
  the eager model, which names the layer (under ``check_mode="per_module"`` too);
* the attention probe runs each logging step's forward once more, eagerly and without gradients
  (``torch.compiler.set_stance("force_eager")``), and reads the attention there;
* parameter hooks (``grads/``, ``weights/``, ``update_ratio/``) and optimizer hooks run in eager
  autograd and the optimizer, untouched by compilation, so they stay exact.

``torch.compiler.disable`` is applied lazily, from inside the traced hook: importing
``torch._dynamo`` up front would cost every ``watch()`` seconds.

Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): code
compiled before ``watch`` would never call our hooks, and code compiled while watching would go on
calling a closed watcher's. So ``watch`` of an already compiled model, and ``close()`` of a watcher
that saw a compiled forward, drop dynamo's compiled code (``torch._dynamo.reset()``): the next
compiled call retraces, once, with the hooks as they are now.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["compiling", "outside_graph", "is_compiled", "forget_compiled_code", "COMPILED_WARNING"]

COMPILED_WARNING = (
    "introspect: the model runs under torch.compile, whose graph calls no per-layer hook: activations/, "
    "activation_grads/, feature maps and the residual-stream (massive activation) check are not logged for "
    "its layers. weights/, grads/ and update_ratio/ are exact; attention/ is read from an eager rerun of each "
    "logging step's forward, without gradients; a NaN/Inf is still caught on every checked step and named at "
    "its layer by an eager replay of that step (check_mode='per_module' included). Watch the uncompiled model "
    "to see its layers' activations"
)


compiling = torch.compiler.is_compiling
"""True while dynamo traces the calling code; otherwise one cheap call (every hook asks first)."""


def outside_graph(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` eagerly from code dynamo is tracing (a graph break, then ``fn`` as Python)."""
    return torch.compiler.disable(fn)(*args)


def is_compiled(model: nn.Module, root: nn.Module) -> bool:
    """``torch.compile(model)`` somewhere in the wrappers, or ``root.compile()`` done in place."""
    if getattr(root, "_compiled_call_impl", None) is not None:
        return True
    seen = set()
    wrapper: object = model
    while isinstance(wrapper, nn.Module) and id(wrapper) not in seen:
        seen.add(id(wrapper))
        if type(wrapper).__name__ == "OptimizedModule":
            return True
        wrapper = getattr(wrapper, "_orig_mod", None) or getattr(wrapper, "module", None)
    return False


def forget_compiled_code() -> None:
    """Make compiled models retrace with the hooks they have now (see the module docstring)."""
    if "torch._dynamo" in sys.modules:  # never imported: nothing was compiled
        torch.compiler.reset()

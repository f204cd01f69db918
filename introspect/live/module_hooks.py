"""The per-module output hooks, present only on the steps that want module outputs.

A step whose probes want no module's output (off the logging cadence) then costs the root's
hooks alone, not a Python call per module. The hooks are installed when such a step opens (in the
root's forward pre-hook, which stays) and removed when it closes, except where they must stay for
the whole watch: under ``torch.compile`` (hooks that come and go would make compiled code
recompile; dynamo does not guard on them), with ``step_fn=`` (a child's forward may be the first
to see a new step) and under ``check_mode="per_module"`` (whose check wants every module's
output on every step).

Each module's hook is registered once, on the first step that wants it; later logging steps put
the same hook back under the same handle's id (``_torch.rehook``: one dict entry per module,
no new handle and weak references, which on a model of hundreds of modules are hundreds of
Python objects a logging step and bring garbage collections nearer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .._torch import forward_hooks_of, rehook
from ..errors import IntrospectWarning, warn

__all__ = ["ModuleHooks"]


class ModuleHooks:
    """The output hooks of every watched module but the root (whose own hook stays)."""

    def __init__(self, modules: Mapping[str, nn.Module], root: nn.Module, hooks: Mapping[str, Callable[..., Any]]):
        self._targets = [(module, hooks[name]) for name, module in modules.items() if module is not root]
        self._handles: list[Any] = []
        """One handle per target once the hooks first went on (kept, and reused, when removed)."""
        self._on = False
        self._permanent = False

    @property
    def installed(self) -> bool:
        return self._on

    def install(self, permanent: bool = False) -> None:
        """Hook every module (idempotent); ``permanent``: :meth:`remove` leaves them from now on."""
        self._permanent = self._permanent or permanent
        if self._on:
            return
        self._on = True
        handles = self._handles
        for i, (module, hook) in enumerate(self._targets):
            if i < len(handles) and rehook(handles[i], hook, forward_hooks_of(module)):
                continue
            handle = module.register_forward_hook(hook)
            if i < len(handles):
                handles[i] = handle
            else:
                handles.append(handle)

    def remove(self) -> None:
        """The step that wanted them closed: unhook, unless they are permanent."""
        if self._on and not self._permanent:
            self.undo()

    def undo(self) -> None:
        """Unhook whatever is hooked (the watch's teardown); never raises."""
        self._on = False
        for handle in reversed(self._handles):
            try:
                handle.remove()  # idempotent
            except Exception as e:
                warn(f"introspect: could not undo a module hook: {type(e).__name__}: {e}", IntrospectWarning)

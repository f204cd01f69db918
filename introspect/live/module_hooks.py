"""The per-module output hooks, present only on the steps that want module outputs.

A step whose probes want no module's output (off the logging cadence) then costs the root's
hooks alone, not a Python call per module. The hooks are installed when such a step opens (in the
root's forward pre-hook, which stays) and removed when it closes, except where they must stay for
the whole watch: under ``torch.compile`` (hooks that come and go would make compiled code
recompile; dynamo does not guard on them), with ``step_fn=`` (a child's forward may be the first
to see a new step) and under ``check_mode="per_module"`` (whose check wants every module's
output on every step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..runtime.registry import Registry

__all__ = ["ModuleHooks"]


class ModuleHooks:
    """The output hooks of every watched module but the root (whose own hook stays)."""

    def __init__(self, modules: Mapping[str, nn.Module], root: nn.Module, hooks: Mapping[str, Callable[..., Any]]):
        self._targets = [(module, hooks[name]) for name, module in modules.items() if module is not root]
        self._handles = Registry()
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
        for module, hook in self._targets:
            self._handles.hook(module.register_forward_hook(hook))

    def remove(self) -> None:
        """The step that wanted them closed: unhook, unless they are permanent."""
        if self._on and not self._permanent:
            self.undo()

    def undo(self) -> None:
        """Unhook whatever is hooked (the watch's teardown)."""
        self._on = False
        self._handles.undo()

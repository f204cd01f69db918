"""The probe protocol: what a concern of ``watch`` sees of a training step.

A probe is told about a small set of events, in this order within a step:

==========================  ======================================================================
``on_first_batch``          once, on the first training forward, before its step opens (extra
                            forwards here are not observed)
``on_step_start(plan)``     a step opened; ``plan`` says whether it logs, checks, draws
``on_forward(args, kw)``    each counted forward of the root, after its step opened
``on_forward_end(output)``  that forward returned (or raised: ``output`` is None then)
``on_output``               a selected module's forward returned
``on_output_grad``          the gradient w.r.t. one floating output of a selected module arrived
``on_param_grad``           a watched parameter's gradient was accumulated
``on_after_backward``       the backward pass finished
``on_optimizer_pre/step``   just before / after ``optimizer.step()`` (with ``optimizer=``)
``on_step_end(host)``       the step is over; ``host`` holds its records on the host on a logging
                            step (after the one transfer), else None
``on_close(failed)``        the watch ends
``on_error(error)``         an exception left a counted forward of the root, or the watch (its
                            ``with`` block, or ``close()`` called while one is handled): every
                            probe that has this method hears it, whatever the step; it must not
                            change the error, raise, or keep it
==========================  ======================================================================

The per-module and per-step events reach a probe only on steps it is ``active`` for (a probe that
is off costs nothing then): by default logging steps. A user probe needs only ``name``,
``select`` and ``on_output`` (and optionally ``on_output_grad``); what those return is written as
the scalars ``{name}/{key}/{module}``. The built-in probes in ``introspect.probes`` implement the
same class, and reach the step's records through ``self.ctx`` (a :class:`ProbeContext`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import IntrospectWarning, ProbeError, warn
from ..records.shards import user_type_name
from ..runtime.tensors import named_float_tensors


@dataclass(frozen=True)
class StepPlan:
    """What one step does. ``logging``: statistics and histograms; ``checking``: the non-finite
    check; ``images``: feature-map pictures."""

    step: int
    logging: bool
    checking: bool
    images: bool


class WatchOptions(Protocol):
    """The options of the watch a probe serves, as probes read them (``introspect.live.config``'s
    ``WatchConfig`` is the one implementation; probes sit below it and see only this view)."""

    every: int
    log: frozenset[str]
    optimizer: Any
    on_nonfinite: str
    check_every: int
    check_mode: str
    thresholds: Thresholds
    hparams: Mapping[str, Any] | None
    image_every: int
    log_inputs: bool
    ranks: str
    grad_scaler: Any
    strict: bool


if TYPE_CHECKING:  # pragma: no cover
    from ..debugger.health import Thresholds
    from ..records.findings import Findings
    from ..records.step import HostStep, StepBuffer
    from ..records.writer import GuardedWriter
    from ..runtime.registry import Registry

__all__ = ["Probe", "ProbeContext", "EVENTS"]

EVENTS = (
    "on_first_batch",
    "on_step_start",
    "on_forward",
    "on_forward_end",
    "on_output",
    "on_output_grad",
    "on_param_grad",
    "on_after_backward",
    "on_optimizer_pre",
    "on_optimizer_step",
    "on_step_end",
    "on_close",
    "on_error",
)


class Probe:
    """A statistic of your own, computed by ``watch`` on logging steps.

    >>> class AbsMax(introspect.Probe):
    ...     name = "absmax"                              # tags absmax/{key}/{module}
    ...     def select(self, name, module):              # which watched modules (default: all)
    ...         return isinstance(module, nn.Linear)
    ...     def on_output(self, name, module, output):   # logging steps only
    ...         return {"out": output.abs().amax()}      # stays on the device until the step ends
    >>> watch(model, writer, probes=[AbsMax()])         # doctest: +SKIP

    Values may be 1-element tensors (kept on their device until the step's single transfer) or
    Python numbers. A probe that raises is disabled with one warning, or raises
    :class:`introspect.ProbeError` under ``watch(..., strict=True)``; training goes on.
    """

    name: str = ""
    builtin: bool = False
    """Built-in probes share the module's fate: an error in one stops watching that module."""
    ctx: ProbeContext

    def bind(self, ctx: ProbeContext) -> None:
        """Called once by the watcher, before any event."""
        self.ctx = ctx

    def active(self, plan: StepPlan) -> bool:
        """Whether this probe takes part in a step; by default on logging steps only."""
        return plan.logging

    def select(self, name: str, module: nn.Module) -> bool:
        """Whether this probe sees ``module`` (``name`` is its dotted name); default: every
        watched module."""
        return True

    def on_output(self, name: str, module: nn.Module, output: Any) -> Mapping[str, torch.Tensor | float] | None:
        """``module``'s forward returned ``output``; return scalars to write, keyed by what they are."""
        return None

    def on_output_grad(
        self, name: str, module: nn.Module, grad: torch.Tensor
    ) -> Mapping[str, torch.Tensor | float] | None:
        """The gradient w.r.t. one floating output of ``module`` (``name`` carries the output's
        suffix when the module returns several, e.g. ``lstm/0``); return scalars as in ``on_output``."""
        return None

    # The step-level events (see the module docstring); the built-in probes use them.
    def on_first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None: ...
    def on_step_start(self, plan: StepPlan) -> None: ...
    def on_forward(self, args: tuple, kwargs: dict) -> None: ...
    def on_forward_end(self, output: Any) -> None: ...
    def on_param_grad(self, name: str, param: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_optimizer_pre(self) -> None: ...
    def on_optimizer_step(self) -> None: ...
    def on_step_end(self, host: HostStep | None) -> None: ...
    def on_close(self, failed: bool) -> None: ...
    def on_error(self, error: BaseException) -> None: ...


def overrides(probe: Probe, event: str) -> bool:
    """Whether ``probe`` has its own ``event`` method (the watcher skips events nobody handles)."""
    return getattr(type(probe), event, None) is not getattr(Probe, event)


class ProbeContext:
    """What probes share during a watch: the options, the model's names, the open step and its
    records, the writer, the findings, and the services (AMP scale, DDP state, disabling)."""

    def __init__(
        self,
        *,
        config: WatchOptions,
        model: nn.Module,
        root: nn.Module,
        modules: dict[str, nn.Module],
        params: dict[str, nn.Parameter],
        writer: GuardedWriter,
        findings: Findings,
        step_hooks: Registry,
        force_log: Callable[[], None],
        unobserved: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        self.config = config
        self.model = model
        self.root = root
        self.modules = modules
        self.module_types = {name: user_type_name(m) for name, m in modules.items()}
        self.params = params
        self.writer = writer
        self.findings = findings
        self.step_hooks = step_hooks
        """Hooks that live for the open step only (removed when it ends)."""
        self.force_log = force_log
        """Make the next step a logging step whatever the cadence (after a NaN/Inf)."""
        self.unobserved = unobserved
        """A context in which the model's forwards are not observed (the watcher's own: a replay)."""
        self.check_mode = "off"
        """How the non-finite check runs: "replay" (the sentinel), "per_module" or "off"."""
        self.plan: StepPlan | None = None
        self.buffer: StepBuffer | None = None
        self.ddp: nn.Module | None = None
        self.shards: Any = None
        """The ``sharded.ShardCombiner`` of sharded training (FSDP2, FSDP1 views), else None."""
        self.side_group: Any = None
        """The watcher's own process group (``distributed.SideGroup``) for its collectives."""
        self.ddp_sync = False  # the latest forward's backward all-reduces gradients
        self.closing = False  # the watch is ending: no finding may raise now
        self.overflow_step = -1  # the latest step whose scaled gradients overflowed (GradScaler)
        self.call_index = -1  # the non-finite check's number for the module call being dispatched
        self.compiled = False
        """The model runs under ``torch.compile``: a probe that would add hooks or a function mode
        per step stays off (either would make compiled code recompile)."""
        self.disabled: set[str] = set()
        self._tensors_of: Any = None
        self._tensors: list[tuple[str, torch.Tensor]] = []
        self._outputs_name: str | None = None
        self._outputs: list[tuple[str, str, torch.Tensor]] = []

    # ------------------------------------------------------------ shared views of an output
    def tensors(self, output: Any) -> list[tuple[str, torch.Tensor]]:
        """``named_float_tensors(output)``, computed once per module call for every probe."""
        if output is not self._tensors_of:
            self._tensors_of, self._tensors = output, named_float_tensors(output)
        return self._tensors

    def forget_output(self) -> None:
        """Drop the last output's view (nothing holds on to activations between calls)."""
        self._tensors_of, self._tensors = None, []
        self._outputs_name, self._outputs = None, []

    def grad_scale(self) -> torch.Tensor | None:
        """GradScaler's current scale on the device (no host sync), or None without one."""
        if self.config.grad_scaler is None:
            return None
        from ..runtime.amp import scale_tensor

        return scale_tensor(self.config.grad_scaler)

    # ------------------------------------------------------------ failures
    def disable(self, key: str, module: nn.Module | None, error: Exception) -> None:
        """A built-in probe failed on ``key`` (a module, or ``<writer>``-like name): warn once and
        stop it; training goes on (``strict=True``: raise ``ProbeError``)."""
        what = f"{key} ({type(module).__name__})" if module is not None else key
        self._fail(
            key, key, error, f"the probe on {what} failed", f"stopped watching {what} after an error in its probe"
        )

    def disable_probe(self, probe: Probe, where: str, module: nn.Module | None, error: Exception) -> None:
        """A user probe failed: it stops for the rest of the run, with one warning."""
        what = f"{where} ({type(module).__name__})" if module is not None else where
        self._fail(
            f"<probe {probe.name}>",
            where,
            error,
            f"probe {probe.name!r} failed on {what}",
            f"probe {probe.name!r} stopped after an error on {what}",
        )

    def _fail(self, key: str, module: str, error: Exception, failed: str, stopped: str) -> None:
        if key in self.disabled:
            return
        self.disabled.add(key)
        if self.config.strict:
            raise ProbeError(
                f"introspect: {failed}: {type(error).__name__}: {error} "
                "(strict=True; without it the probe would stop and training go on)",
                module,
            ) from error
        warn(f"introspect: {stopped}: {type(error).__name__}: {error}", IntrospectWarning)

    def outputs(self, name: str, output: Any) -> list[tuple[str, str, torch.Tensor]]:
        """``[(where, suffix, tensor)]`` of a module call: ``where`` is the tag name, the module's
        own name with the output's suffix when it returns several floating tensors."""
        if output is not self._tensors_of or self._outputs_name != name:
            tensors = self.tensors(output)
            self._outputs_name = name
            self._outputs = (
                [(name, tensors[0][0], tensors[0][1])]
                if len(tensors) == 1
                else [(f"{name}/{suffix}", suffix, tensor) for suffix, tensor in tensors]
            )
        return self._outputs

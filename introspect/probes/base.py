"""The probe protocol: what a concern of ``watch`` sees of a training step.

A probe is told about a small set of events, in this order within a step:

===============================  =================================================================
``on_first_batch``               once, on the first training forward, before its step opens (extra
                                 forwards here are not observed)
``on_step_start(plan)``          a step opened; ``plan`` says whether it logs, checks, draws
``on_forward(args, kw)``         each counted forward of the root, after its step opened
``on_forward_end(output)``       that forward returned (or raised: ``output`` is None then)
``on_output``                    a selected module's forward returned
``on_output_grad``               the gradient w.r.t. one floating output of a selected module arrived
``on_param_grad``                a watched parameter's gradient was accumulated (only for a probe
                                 whose ``wants_param_grads`` is True: it costs a hook per parameter)
``on_after_backward``            the backward pass finished (DDP/FSDP may still be reducing the
                                 gradients)
``on_after_reduction``           the gradients are final: after DDP's all-reduce or FSDP's
                                 reduce-scatter; without either, right after ``on_after_backward``
``on_before_optimizer_step``     just before ``optimizer.step()`` (with ``optimizer=``)
``on_after_optimizer_step``      just after it
``on_step_end(host)``            the step is over; ``host`` holds its records on the host on a
                                 logging step (after the one transfer), else None
``on_close(failed)``             the watch ends
``on_error(error)``              an exception left a counted forward of the root, or the watch (its
                                 ``with`` block, or ``close()`` called while one is handled): every
                                 probe that has this method hears it, whatever the step; it must not
                                 change the error, raise, or keep it
===============================  =================================================================

The per-module and per-step events reach a probe only on steps it is ``active`` for (a probe that
is off costs nothing then): by default logging steps. A user probe needs only ``name``,
``select`` and ``on_output`` (and optionally ``on_output_grad``); what those return is written as
the scalars ``{name}/{key}/{module}``. The built-in probes in ``introspect.probes`` implement the
same class, and reach the watch through ``self.ctx`` (a :class:`ProbeContext`): everything a probe
may read is declared there, and what belongs to the open step is on its record, ``ctx.buffer``.

The optimizer events follow Lightning's names; a probe written against their first names
(``on_optimizer_pre``, ``on_optimizer_step``) is still called, with one ``DeprecationWarning``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import IntrospectWarning, ProbeError, warn
from ..records.shards import user_type_name
from ..runtime.tensors import named_float_tensors
from . import time_share
from .time_share import TimeShare

if TYPE_CHECKING:  # pragma: no cover
    from ..debugger.health import Thresholds
    from ..records.budget import TagBudget
    from ..records.findings import Findings
    from ..records.shards import ShardCombiner
    from ..records.step import HostStep, StepBuffer
    from ..records.writer import GuardedWriter
    from ..runtime.distributed import SideGroup
    from ..runtime.registry import Registry

__all__ = ["Probe", "ProbeContext", "StepPlan", "WatchOptions", "StepCounter", "EVENTS", "RENAMED_EVENTS"]


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
    ``WatchConfig`` is the one implementation; probes sit below it and see only this view, read-only)."""

    @property
    def every(self) -> int: ...
    @property
    def log(self) -> frozenset[str]: ...
    @property
    def optimizer(self) -> Any: ...
    @property
    def on_nonfinite(self) -> str: ...
    @property
    def check_every(self) -> int: ...
    @property
    def check_mode(self) -> str: ...
    @property
    def thresholds(self) -> Thresholds: ...
    @property
    def summary(self) -> bool: ...
    @property
    def graph(self) -> bool: ...
    @property
    def hparams(self) -> Mapping[str, Any] | None: ...
    @property
    def image_every(self) -> int: ...
    @property
    def log_inputs(self) -> bool: ...
    @property
    def ranks(self) -> str: ...
    @property
    def grad_scaler(self) -> Any: ...
    @property
    def strict(self) -> bool: ...


class StepCounter(Protocol):
    """The watch's step clock as probes read it (``introspect.live.clock.StepClock``)."""

    @property
    def step(self) -> int:
        """The open step, or the latest one between steps (0 before the first)."""
        ...

    @property
    def next_step(self) -> int:
        """The number the next step would get (without ``step_fn=``, which names steps itself)."""
        ...


EVENTS = (
    "on_first_batch",
    "on_step_start",
    "on_forward",
    "on_forward_end",
    "on_output",
    "on_output_grad",
    "on_param_grad",
    "on_after_backward",
    "on_after_reduction",
    "on_before_optimizer_step",
    "on_after_optimizer_step",
    "on_step_end",
    "on_close",
    "on_error",
)

RENAMED_EVENTS = {"on_optimizer_pre": "on_before_optimizer_step", "on_optimizer_step": "on_after_optimizer_step"}
"""Old event name -> new: a probe that defines an old one is called under the new one, with a
``DeprecationWarning`` when its class is defined."""


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
    wants_param_grads: bool = False
    """Whether ``on_param_grad`` is wanted: it costs a hook on every watched parameter on each
    step the probe is active, so it is asked for, not inferred."""
    ctx: ProbeContext
    """The watch this probe serves, set by :meth:`bind`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A method under an old event name (``RENAMED_EVENTS``) answers to the new one too."""
        super().__init_subclass__(**kwargs)
        for old, new in RENAMED_EVENTS.items():
            method = vars(cls).get(old)
            if method is None:
                continue
            warn(
                f"{cls.__qualname__}.{old} is deprecated: the event is now called {new} "
                "(Lightning's name); rename the method",
                DeprecationWarning,
            )
            if new not in vars(cls):
                setattr(cls, new, method)

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
    def on_after_reduction(self) -> None: ...
    def on_before_optimizer_step(self) -> None: ...
    def on_after_optimizer_step(self) -> None: ...
    def on_step_end(self, host: HostStep | None) -> None: ...
    def on_close(self, failed: bool) -> None: ...
    def on_error(self, error: BaseException) -> None: ...


def overrides(probe: Probe, event: str) -> bool:
    """Whether ``probe`` has its own ``event`` method (the watcher skips events nobody handles)."""
    return getattr(type(probe), event, None) is not getattr(Probe, event)


class ProbeContext:
    """What probes share during a watch. Everything a probe may read is declared here; what
    belongs to the open step (the forward's DDP state, the module call being dispatched, a scaler
    overflow) is on that step's record, ``buffer``. Made by the watcher, which alone sets the
    attributes it says it sets."""

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
        clock: StepCounter,
        step_hooks: Registry,
        force_log: Callable[..., bool],
        side_group: SideGroup,
        check_mode: str = "off",
        ddp: nn.Module | None = None,
        shards: ShardCombiner | None = None,
        unobserved: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        budget: TagBudget | None = None,
    ) -> None:
        self.config = config
        """The watch's options."""
        self.model = model
        """The model as the user passed it (maybe a DDP or compiled wrapper)."""
        self.root = root
        """The model itself, unwrapped: the module whose forward is a training step."""
        self.modules = modules
        """The watched modules by tag name (``include=``/``exclude=`` applied)."""
        self.module_types = {name: user_type_name(m) for name, m in modules.items()}
        """Their type names as the user knows them (a compiled or wrapped module's own class)."""
        self.params = params
        """The watched parameters by tag name."""
        self.writer = writer
        """The guarded writer: a failing write disables writing, not training (falsy without one)."""
        self.findings = findings
        """What the debugger found so far; ``findings.add`` records a new one."""
        self.clock = clock
        """The step clock: ``clock.step`` outside a step (``on_close``), ``clock.next_step`` before
        the first (``on_first_batch``); inside a step, ``buffer.step``."""
        self.step_hooks = step_hooks
        """Hooks that live for the open step only (removed when it ends)."""
        self.force_log = force_log
        """``force_log(steps=1, budgeted=False)``: make the next ``steps`` steps logging steps
        whatever the cadence (an escalation, after a NaN/Inf; a cheap signal's goes through
        ``escalate``, within its budget)."""
        self.check_mode = check_mode
        """How the non-finite check runs: "replay" (the sentinel), "per_module" or "off"."""
        self.ddp = ddp
        """The DistributedDataParallel wrapper of the model, or None."""
        self.shards = shards
        """The combiner of sharded training's records (FSDP2, FSDP1 views), else None."""
        self.side_group = side_group
        """The watcher's own process group for its collectives (made on first use)."""
        self.unobserved = unobserved
        self.budget = budget
        """Which per-module tags are written (a budget above ``max_modules``); None: every one."""
        """A context in which the model's forwards are not observed (the watcher's own: a replay)."""
        self.plan: StepPlan | None = None
        """The open step's plan; None between steps (set by the watcher's dispatch)."""
        self.buffer: StepBuffer | None = None
        """The open step's record: its histograms, scalars, checks and per-step state; None
        between steps (set by the watcher's dispatch)."""
        self.closing = False
        """The watch is ending (set by the watcher): no finding may raise now."""
        self.compiled = False
        """The model runs under ``torch.compile`` (set by the watcher when it sees so): a probe that
        would add hooks or a function mode per step stays off (either would make compiled code
        recompile)."""
        self.disabled: set[str] = set()
        """Keys (module names, ``<probe name>``, ``<writer>``...) that failed and are off for good."""
        self.figures = TimeShare(time_share.RENDER_SHARE)
        """The one budget of every matplotlib figure drawn on the training thread before close (the
        health map, the gradient-flow figure): ``RENDER_SHARE`` of the run's time so far. A figure
        that does not fit now is drawn when it does, and always at close."""
        self.figures.start()
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

    def escalate(self) -> bool:
        """A cheap every-step signal fired: the next ``thresholds.escalate_steps`` steps log, within
        the escalations' budget of time (``thresholds.escalate_share``, see ``live/clock.py``; a
        NaN/Inf calls ``force_log`` instead, which no budget limits). Whether they will."""
        steps = int(self.config.thresholds.escalate_steps)
        return steps > 0 and bool(self.force_log(steps, budgeted=True))

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

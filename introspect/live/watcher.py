"""The watcher: a step clock, a registry of what it changed, and the dispatch of events to probes.

Lifecycle of a step (see :mod:`introspect.live.clock` for when steps open and end):

* the root's forward pre-hook opens the step and asks the clock for its plan; the probes active
  for that plan get ``on_step_start`` (on a logging step: weights, and hooks on the parameters'
  gradient accumulation for this step only);
* each selected module's forward hook dispatches ``on_output`` to the active probes that selected
  it, and hooks the output's gradient when one of them wants ``on_output_grad``;
* the backward's first gradient hook queues its end: ``on_after_backward``, then
  ``on_after_reduction`` once DDP or FSDP have reduced the gradients (see :mod:`.dispatch`);
* the step ends at the next training forward, at ``optimizer.step()``, or on exit: its records
  cross to the host in one transfer, are written, and the probes get ``on_step_end``.

The per-module output hooks exist only on the steps whose probes want module outputs (logging
steps; every checked step under ``check_mode="per_module"``): installed when such a step opens
(in the root's forward pre-hook, which stays) and removed when it closes. Off the logging cadence
a step costs the root's hooks and the non-finite sentinel's few reductions, whatever the number
of modules; nothing is kept, nothing is written. Under ``torch.compile``, with ``step_fn=`` and
under ``check_mode="per_module"``
the per-module hooks stay for the whole watch (see :mod:`introspect.live.module_hooks`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..debugger.alerts import Alert, format_report
from ..errors import AlreadyWatchedError, IntrospectWarning, warn
from ..probes.base import Probe, ProbeContext, overrides
from ..probes.divergence import MIN_RANKS
from ..probes.nonfinite.sentinel import check_mode_for
from ..records.budget import TagBudget
from ..records.findings import Findings
from ..records.shards import shard_combiner
from ..records.writer import SIGNAL_STALL_S, GuardedWriter
from ..runtime.compiled import (
    COMPILED_WARNING,
    compiling,
    forget_compiled_code,
    is_compiled,
    outside_graph,
)
from ..runtime.distributed import (
    SideGroup,
    find_ddp,
    rank_and_world,
    rank_writer_target,
    writes_here,
)
from ..runtime.registry import ACTIVE, Registry
from ..runtime.selection import select_modules, select_parameters, unwrap_model
from .clock import StepClock
from .config import WatchConfig
from .dispatch import Dispatch
from .module_hooks import ModuleHooks
from .signals import SignalGuard

__all__ = ["Watcher"]


class Watcher:
    """Hooks on one model while it trains. Made by :func:`introspect.watch`; see it for options.

    Read ``step`` for your own logging, ``alerts`` for what the debugger found and ``report()`` for
    the same in words. ``close()`` (or leaving the ``with`` block) removes every hook.
    """

    def __init__(self, model: nn.Module, writer: Any, config: WatchConfig) -> None:
        from ..probes import built_in_probes

        root = unwrap_model(model)
        if root in ACTIVE:
            raise AlreadyWatchedError(
                f"{type(root).__name__} is already being watched; leave the first watch() (or call "
                "its close()) before starting another on the same model"
            )
        modules = select_modules(root, config.include, config.exclude)
        self.model = model
        self.config = config
        self._root = root
        self._closed = False
        self._active = False  # inside a counted (training, grad-enabled) forward of the root
        self._suspended = False  # our own extra forwards (summary, graph) are not observed
        self._registry = Registry()
        self._step_hooks = Registry()
        self._module_hooks: ModuleHooks | None = None  # made when the hooks go on (see module_hooks.py)
        self._guard: SignalGuard | None = None
        self._compiled_seen = False  # an output hook was traced by torch.compile (see compiled.py)
        self._compiled_warned = False
        try:
            target = rank_writer_target(writer, config.ranks) if writes_here(config.ranks) else False
            self._writer = GuardedWriter.open(target, self._registry, self._writer_failed)
            # Findings are linked by cause within story_window logging steps (see debugger/story.py).
            window = int(config.thresholds.story_window * max(config.every, 1))
            self.findings = Findings(
                self._writer,
                order=[n for n, _ in root.named_modules()],
                window=window,
                lookback=int(config.thresholds.escalate_steps) + 1,
            )
            self._clock, self.ctx = _probe_context(
                model,
                root,
                modules,
                config,
                writer=self._writer,
                findings=self.findings,
                step_hooks=self._step_hooks,
                force_log=self._force_log,
                unobserved=self._unobserved,
            )
            self._probes: list[Probe] = [*built_in_probes(config, self.ctx), *config.probes]
            for probe in self._probes:
                probe.bind(self.ctx)
            for probe in config.probes:
                if overrides(probe, "on_param_grad") and not probe.wants_param_grads:
                    warn(
                        f"introspect: probe {probe.name!r} defines on_param_grad but its wants_param_grads "
                        "is False, so it will not be called: set wants_param_grads = True",
                        IntrospectWarning,
                    )
            self._dispatch = Dispatch(self.ctx, self._probes)
            self._first_batch = [p for p in self._probes if overrides(p, "on_first_batch")]
            self._attach()
        except BaseException:
            self._registry.undo()
            raise

    # ----------------------------------------------------------------- public
    @property
    def step(self) -> int:
        """The step of the most recent training forward (0 before the first)."""
        return self._clock.step

    @property
    def writer(self) -> Any:
        """The SummaryWriter in use (None on a non-zero distributed rank, or after it failed)."""
        return self._writer.writer

    @property
    def alerts(self) -> list[Alert]:
        """What the debugger found, in the order it found it."""
        return self.findings.alerts

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The probes at work: the built-in ones, then yours (``probes=``)."""
        return tuple(self._probes)

    @property
    def module_names(self) -> list[str]:
        """Tag names of the modules whose outputs are watched."""
        return list(self.ctx.modules)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters whose weights and gradients are watched."""
        return list(self.ctx.params)

    every = property(lambda self: self.config.every, doc="Log every N steps.")
    log = property(lambda self: self.config.log, doc="What is captured on logging steps.")
    on_nonfinite = property(lambda self: self.config.on_nonfinite)
    check_every = property(lambda self: self.config.check_every)
    image_every = property(lambda self: self.config.image_every)
    thresholds = property(lambda self: self.config.thresholds)

    def report(self) -> str:
        """What the debugger found, as a short table for the terminal."""
        text = format_report(self.alerts, self._clock.next_step)
        if self._clock.escalations_skipped:
            text += (
                f"\n{self._clock.escalations_skipped} escalations skipped (budget): a signal fired, but the "
                "logging steps after it would have taken more than thresholds.escalate_share of the run's time."
            )
        if self._writer.dropped:
            text += (
                f"\n{self._writer.dropped} writes dropped: the writer was slower than training (its queue was "
                "full); training did not wait for it."
            )
        return text

    @property
    def dropped_writes(self) -> int:
        """Writes dropped because the writer lagged behind training (its queue was full)."""
        return self._writer.dropped

    def finish(self, metrics: Mapping[str, Any] | None = None) -> None:
        """Record the run's final (or best) metrics beside its ``hparams`` for TensorBoard's
        HPARAMS dashboard, then close. Call it once, inside the ``with`` block or after it.

        >>> w.finish(metrics={"val_acc": 0.92})                      # doctest: +SKIP
        """
        from ..probes.hparams import Hparams

        hparams = next(p for p in self._probes if isinstance(p, Hparams))
        hparams.set_final_metrics(metrics)  # raises when the session has ended already
        if not self._closed:
            self.close()  # writes the metrics before it closes or flushes the writer
        elif self._writer:
            # After close: a closed torch SummaryWriter reopens its file for this one record.
            hparams.on_close(failed=False)
            self._writer.finish()

    def close(self) -> None:
        """Finish the current step, write it, remove every hook, flush; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.ctx.closing = True
        error = sys.exc_info()[1]  # what is leaving the with block (or being handled around close())
        failed = error is not None
        try:
            try:
                if error is not None:
                    self._dispatch.error(error)
                self._dispatch.close_step()
            finally:
                self._dispatch.close_probes(failed)
                self.findings.close(self._clock.step)  # the whole story, once, before the writer goes
        finally:
            self._active = False
            if self._guard is not None and self._guard.signalled_at is not None:
                self._writer.stall_s = SIGNAL_STALL_S  # being stopped: a hung writer must not keep us
            self._registry.undo()
            guard, self._guard = self._guard, None
            if guard is not None and guard.pending is not None:
                guard.deliver()  # the signal that came while watching, now to its own handler

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.step}"
        return (
            f"Watcher({type(self._root).__name__}, {len(self.ctx.modules)} modules, "
            f"{len(self.ctx.params)} parameters, every={self.config.every}, {state})"
        )

    # ----------------------------------------------------------------- set-up and undo
    def _attach(self) -> None:
        root, registry = self._root, self._registry
        ACTIVE[root] = self
        registry.add("the table of watched models", lambda: ACTIVE.pop(root, None))
        if is_compiled(self.model, root):
            self.ctx.compiled = True
            forget_compiled_code()  # code compiled before now would never call our hooks
        # Compiled code would go on calling our (removed) hooks.
        registry.add("compiled code", self._forget_compiled_code)
        registry.hook(root.register_forward_pre_hook(self._on_root_pre, with_kwargs=True))
        # The root's own output hook stays (one hook: a constant cost), and comes before
        # _on_root_post; every other module's comes and goes with the steps that need it.
        hooks = {name: self._make_output_hook(name) for name in self.ctx.modules}
        for name, module in self.ctx.modules.items():
            if module is root:
                registry.hook(module.register_forward_hook(hooks[name]))
        self._module_hooks = ModuleHooks(self.ctx.modules, root, hooks)
        registry.add("the per-module hooks", self._module_hooks.undo)
        if self._module_hooks_always():
            self._module_hooks.install(permanent=True)
        # Registered last so that it runs after the root's own output hook.
        registry.hook(root.register_forward_hook(self._on_root_post, always_call=True))
        optimizer = self.config.optimizer
        if optimizer is not None:
            registry.hook(optimizer.register_step_pre_hook(self._before_optimizer_step))
            registry.hook(optimizer.register_step_post_hook(self._after_optimizer_step))
        guard = SignalGuard(close=self.close)
        if guard.install():
            self._guard = guard
            registry.add("the signal handlers", guard.restore)
        registry.add("the step's hooks", self._step_hooks.undo)

    def _module_hooks_always(self) -> bool:
        """Whether the per-module hooks stay for the whole watch (see :mod:`.module_hooks`)."""
        return self.ctx.compiled or self.config.step_fn is not None or self.ctx.check_mode == "per_module"

    def _forget_compiled_code(self) -> None:
        if self._compiled_seen:
            forget_compiled_code()

    def _writer_failed(self, error: Exception) -> None:
        self.ctx.disable("<writer>", None, error)

    def _force_log(self, steps: int = 1, *, budgeted: bool = False) -> bool:
        return self._clock.request_log(steps, budgeted=budgeted)

    # ----------------------------------------------------------------- the root: step clock
    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if compiling():  # the step clock runs eagerly, outside a compiled graph
            self.ctx.compiled = True
            return outside_graph(self._open_forward, module, args, kwargs)
        return self._open_forward(module, args, kwargs)

    def _open_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A root that calls itself recursively would count each call as a step; a depth counter
        # cannot be kept honest, since torch skips always_call hooks on KeyboardInterrupt.
        if self._suspended or self._closed:
            return None
        self._active = module.training and torch.is_grad_enabled()
        if not self._active:
            return None
        if self._guard is not None and self._guard.pending is not None and self._at_step_boundary():
            self._active = False
            self.close()  # writes the step that just completed, then passes the signal on
            return None
        try:
            if self._first_batch:
                self._run_first_batch(module, args, kwargs)
            self._sync_step()
            self._dispatch.forward(args, kwargs)
        except BaseException:  # e.g. NonFiniteError: this forward never starts
            self._active = False
            raise
        return None

    def _at_step_boundary(self) -> bool:
        buffer = self.ctx.buffer
        return buffer is None or self._clock.forward_ends_step(buffer.step)

    def _run_first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Summary, graph and input checks on the real first batch; their forwards are not observed."""
        probes, self._first_batch = self._first_batch, []
        with self._unobserved():
            for probe in probes:
                probe.on_first_batch(module, args, kwargs)

    @contextlib.contextmanager
    def _unobserved(self) -> Iterator[None]:
        """Forwards of our own (summary, graph, the non-finite replay) count no step, reach no probe."""
        was, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = was

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if compiling():
            return outside_graph(self._close_forward, output)
        return self._close_forward(output)

    def _close_forward(self, output: Any = None) -> None:
        if not self._suspended:
            active, self._active = self._active, False
            raised = sys.exc_info()[1]
            if active and output is None and raised is not None:
                self._dispatch.error(raised)  # the forward raised (always_call hooks run in its except)
            if active and self.ctx.buffer is not None:
                # Also after a forward that raised (always_call): a probe's mode must end here.
                self._dispatch.forward_end(output)
        if self._compiled_seen and not self._compiled_warned:
            self._compiled_warned = True
            warn(COMPILED_WARNING, IntrospectWarning)
        return None

    def _sync_step(self) -> None:
        """Open the step a training forward belongs to, ending the previous one if it is over."""
        buffer = self.ctx.buffer
        if buffer is not None and self._clock.forward_ends_step(buffer.step):
            self._dispatch.close_step()
        if self.ctx.buffer is None:
            self._dispatch.open_step(self._clock.plan())
            hooks = self._module_hooks
            if hooks is None:
                return
            if self._module_hooks_always():
                hooks.install(permanent=True)
            elif self._dispatch.wants_module_outputs() and not hooks.installed:
                hooks.install()
                # Removed when the step closes (the dispatch undoes the step's hooks first).
                self.ctx.step_hooks.add("the per-module hooks", hooks.remove)

    def _join_external_step(self, module: nn.Module) -> bool:
        """With ``step_fn=``, a training forward of a watched module counts even when the root is
        not called (a LightningModule's ``training_step`` often calls its children directly)."""
        if not (module.training and torch.is_grad_enabled()):
            return False
        self._sync_step()
        return True

    # ----------------------------------------------------------------- module outputs
    def _make_output_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        ctx, dispatch = self.ctx, self._dispatch

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if compiling():  # traced into a compiled graph: add nothing to it
                self._compiled_seen = self.ctx.compiled = True
                return None
            if self._suspended or name in ctx.disabled:
                return None
            if not self._active and (self.config.step_fn is None or not self._join_external_step(module)):
                return None
            if ctx.buffer is not None:
                dispatch.module_output(name, module, args, output)
            return None

        return hook

    # ----------------------------------------------------------------- optimizer
    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.ctx.buffer is not None:
            self._dispatch.before_optimizer_step()
        return None

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.ctx.buffer is None:
            # optimizer.step() without a training forward since the last one: still a step.
            self._clock.take()
        else:
            self._dispatch.after_optimizer_step()
            self._dispatch.close_step()
        if self._guard is not None and self._guard.pending is not None:
            self.close()  # a step boundary: the step is written; then the signal goes on
        return None


def _probe_context(
    model: nn.Module,
    root: nn.Module,
    modules: Any,
    config: WatchConfig,
    *,
    writer: GuardedWriter,
    findings: Findings,
    step_hooks: Registry,
    force_log: Callable[..., bool],
    unobserved: Callable[[], Any],
) -> tuple[StepClock, ProbeContext]:
    """What the probes share: the parameters watched, their sharding and DDP, the step clock
    (every rank plans the logging steps when their collectives need every rank), the check mode
    and the tag budget."""
    params = select_parameters(root, modules)
    side_group = SideGroup()
    shards = shard_combiner(model, params, config.log, side_group)
    ddp = find_ddp(model)
    shared = shards is not None or (rank_and_world()[1] >= MIN_RANKS and ddp is not None)
    clock = StepClock(
        every=config.every,
        check_every=config.check_every,
        image_every=config.image_every,
        writes=writer.raw is not None,
        counts_optimizer_steps=config.optimizer is not None,
        step_fn=config.step_fn,
        shared=shared,
        escalate_share=config.thresholds.escalate_share,
    )
    return clock, ProbeContext(
        config=config,
        model=model,
        root=root,
        modules=modules,
        params=params,
        writer=writer,
        findings=findings,
        clock=clock,
        step_hooks=step_hooks,
        force_log=force_log,
        side_group=side_group,
        check_mode=check_mode_for(config, root, sharded=shards is not None),
        ddp=ddp,
        shards=shards,
        unobserved=unobserved,
        budget=TagBudget(
            list(modules),
            {p: owner for p in params if (owner := p.rpartition(".")[0]) in modules},
            config.max_modules,
            explicit=config.include is not None,
        ),
    )

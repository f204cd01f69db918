"""The open step: its buffer, which probe hears which event in it, the per-module and backward
hooks that carry events to them, and its end (written, then told to the probes).

The end of a backward is one callback queued behind autograd's work, from the first hook of that
backward (the gradient reaching the model's output, a watched output or a parameter): it tells
``on_after_backward``, then ``on_after_reduction`` once the gradients are final: under DDP (outside
``no_sync``) or sharded training from a second callback queued from the first, which runs after the
wrapper's own end-of-backward callback (its reduction; a raise there cannot stop it from finishing).

At each step's start the dispatch keeps, per event, the probes active for that step's plan (a
probe that is off costs nothing), and works out once a step and per module which of them that
module's output and output gradient go to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from .._torch import compiled_autograd_enabled, post_accumulate_grad_hooks_of, queue_after_backward, rehook
from ..errors import NonFiniteError, ProbeError, warn
from ..probes.base import EVENTS, Probe, ProbeContext, StepPlan, overrides
from ..records.shards import ShardRecords
from ..records.sinks import write_step
from ..records.step import CapturePolicy, HostStep, StepBuffer
from ..records.tags import probe_tag
from ..runtime.distributed import ddp_syncs_gradients

__all__ = ["Dispatch"]

_NO_EVENTS: dict[str, list[Probe]] = {event: [] for event in EVENTS}  # between steps (never changed)


class Dispatch:
    def __init__(self, ctx: ProbeContext, probes: list[Probe]) -> None:
        self.ctx = ctx
        self.probes = probes
        self._module_probes = {
            name: [p for p in probes if p.select(name, module)] for name, module in ctx.modules.items()
        }
        self.events: dict[str, list[Probe]] = _NO_EVENTS
        self._per_module: dict[str, tuple[tuple[Probe, ...], tuple[Probe, ...]]] = {}
        self._per_module_of: dict[tuple[int, ...], dict[str, tuple[tuple[Probe, ...], tuple[Probe, ...]]]] = {}
        """Per set of active probes (as ``_events_of``), each module's (output, output-gradient)
        probes: worked out once per module and set, not once a step."""
        self._grad_hooks: list[tuple[torch.Tensor, Callable[[torch.Tensor], None], Any]] = []
        """(parameter, its hook, its handle): made on the first logging step that wants parameter
        gradients, put back (``rehook``) on later ones: no new Python objects per parameter."""
        self._grad_buffer: StepBuffer | None = None
        self._grad_takers: list[Probe] = []
        self._on_output_grad = self._output_grad  # bound once (each grad hook is a partial of it)
        self._handles = {id(p): {e for e in EVENTS if overrides(p, e)} for p in probes}
        self._error_probes = [p for p in probes if "on_error" in self._handles[id(p)]]
        self._capture = CapturePolicy()  # which records a logging step may hold uncopied (see records.step)
        self._events_of: dict[tuple[int, ...], dict[str, list[Probe]]] = {}
        """The event lists of each set of active probes met so far (a handful): worked out once,
        not on every step (the per-step Python cost matters on small models)."""

    # ----------------------------------------------------------------- step scope
    def open_step(self, plan: StepPlan) -> None:
        """The step's buffer and probes; ``on_step_start``; gradient-accumulation hooks if wanted."""
        ctx = self.ctx
        shards = ShardRecords(ctx.shards) if plan.logging and ctx.shards is not None else None
        buffer = StepBuffer(
            step=plan.step, logging=plan.logging, checking=plan.checking, shards=shards, capture=self._capture
        )
        ctx.plan, ctx.buffer = plan, buffer
        active = [p for p in self.probes if p.active(plan) and (p.builtin or f"<probe {p.name}>" not in ctx.disabled)]
        key = tuple(id(p) for p in active)
        events = self._events_of.get(key)
        if events is None:
            events = self._events_of[key] = {
                event: [p for p in active if event in self._handles[id(p)]] for event in EVENTS
            }
        self.events = events
        per_module = self._per_module_of.get(key)
        if per_module is None:
            per_module = self._per_module_of[key] = {}
        self._per_module = per_module
        for probe in self.events["on_step_start"]:
            probe.on_step_start(plan)
        buffer.settle()  # weights/: before the optimizer moves them
        takers = [p for p in self.events["on_param_grad"] if p.wants_param_grads]
        if takers:
            self._grad_buffer, self._grad_takers = buffer, takers
            self._hook_param_grads()
            ctx.step_hooks.add("the gradient hooks", self._unhook_param_grads)

    def _hook_param_grads(self) -> None:
        """Every parameter's accumulation hook, for this step (see ``_grad_hooks``)."""
        hooks = self._grad_hooks
        if not hooks:
            for name, param in self.ctx.params.items():
                hook = partial(self._param_grad, name)
                hooks.append((param, hook, param.register_post_accumulate_grad_hook(hook)))
            return
        for i, (tensor, grad_hook, handle) in enumerate(hooks):
            if not rehook(handle, grad_hook, post_accumulate_grad_hooks_of(tensor)):
                hooks[i] = (tensor, grad_hook, tensor.register_post_accumulate_grad_hook(grad_hook))

    def _unhook_param_grads(self) -> None:
        self._grad_buffer, self._grad_takers = None, []
        for _, _, handle in reversed(self._grad_hooks):
            handle.remove()  # idempotent; the handle is kept for the next logging step

    def wants_module_outputs(self) -> bool:
        """Whether a probe active in the open step listens to module outputs or their gradients
        (else the step needs no per-module hook at all)."""
        return bool(self.events["on_output"] or self.events["on_output_grad"])

    def forward(self, args: tuple, kwargs: dict) -> None:
        """A counted forward of the root starts in the open step."""
        buffer = self.ctx.buffer
        if buffer is None:
            return
        buffer.ddp_sync = ddp_syncs_gradients(self.ctx.ddp)
        for probe in self.events["on_forward"]:
            probe.on_forward(args, kwargs)

    def forward_end(self, output: Any) -> None:
        """That forward returned (``output``) or raised (None). Its outputs' gradients mark the
        start of its backward for the end-of-backward events."""
        buffer = self.ctx.buffer
        if buffer is None:
            return
        ctx = self.ctx

        def hook(grad: torch.Tensor | None) -> None:  # None: no gradient reached this output
            if not (buffer.closed or ctx.closing):
                self._backward_reached(buffer)

        try:
            for probe in self.events["on_forward_end"]:
                probe.on_forward_end(output)
            # Compiled autograd fails on a hook whose output gets no gradient: none then (the
            # sentinel reads before the optimizer step instead).
            unhooked = ctx.compiled and compiled_autograd_enabled()
            if (
                output is not None
                and not unhooked
                and (self.events["on_after_backward"] or self.events["on_after_reduction"])
            ):
                for _, tensor in ctx.tensors(output):
                    if tensor.requires_grad:
                        tensor.register_hook(hook)
        finally:
            ctx.forget_output()  # the probes' view of the output included
            buffer.settle()  # the activations: before the next forward or an in-place op changes them

    def before_optimizer_step(self) -> None:
        for probe in self.events["on_before_optimizer_step"]:
            probe.on_before_optimizer_step()
        if self.ctx.buffer is not None:
            self.ctx.buffer.settle()

    def after_optimizer_step(self) -> None:
        for probe in self.events["on_after_optimizer_step"]:
            probe.on_after_optimizer_step()

    def close_step(self) -> None:
        """Write the open step, then tell the probes; a NaN/Inf to raise waits until all have run."""
        ctx = self.ctx
        buffer = ctx.buffer
        if buffer is None:
            return
        ctx.step_hooks.undo()
        error: NonFiniteError | None = None
        try:
            host: HostStep | None = None
            if buffer.logging:
                host = buffer.to_host()  # one transfer for the whole step's records
                budget = ctx.budget  # on a large model, which per-module tags are written
                if budget is not None:
                    budget.admit(ctx.findings.alerts)
                ctx.writer.run(write_step, host if budget is None else budget.select(host))
            for probe in self.events["on_step_end"]:
                try:
                    probe.on_step_end(host)
                except NonFiniteError as e:  # on_nonfinite="raise": after the step is complete
                    error = error or e
            ctx.findings.flush(buffer.step)  # the step's new findings: one text, once
        finally:
            buffer.closed = True
            ctx.buffer = ctx.plan = None  # only now: a signal during the transfer loses nothing
            self.events = _NO_EVENTS
            self._per_module = {}
        if error is not None:
            raise error

    def error(self, error: BaseException) -> None:
        """An exception left a counted forward or the watch: ``on_error`` to every probe that has
        it, whatever the step's plan. Nothing here may raise: the user's error goes on as it is."""
        for probe in self._error_probes:
            try:
                probe.on_error(error)
            except Exception as e:
                try:
                    warn(f"introspect: probe {probe.name!r} failed on {type(error).__name__}: {type(e).__name__}: {e}")
                except Exception:  # warnings turned into errors: stay silent rather than replace it
                    pass

    def close_probes(self, failed: bool) -> None:
        """``on_close`` to every probe; one probe's failing end stops neither the others nor the undo."""
        for probe in self.probes:
            try:
                probe.on_close(failed)
            except Exception as e:
                self.ctx.disable(f"<{probe.name}>", None, e)

    # ----------------------------------------------------------------- module outputs
    def _probes_for(self, name: str) -> tuple[tuple[Probe, ...], tuple[Probe, ...]]:
        """This step's (output, output-gradient) probes of one module, worked out once per module
        and set of active probes."""
        found = self._per_module.get(name)
        if found is None:
            active_out = self.events["on_output"]
            active_grad = self.events["on_output_grad"]
            mine = self._module_probes[name]
            found = (tuple(p for p in mine if p in active_out), tuple(p for p in mine if p in active_grad))
            self._per_module[name] = found
        return found

    def module_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        """A selected module's forward returned, in an open step."""
        on_output, on_grad = self._probes_for(name)
        if not on_output and not on_grad:
            return
        ctx = self.ctx
        buffer = ctx.buffer
        if buffer is None:
            return
        buffer.call_index = -1
        buffer.call_args = args
        try:
            for probe in on_output:
                if not self._send(probe, probe.on_output, name, module, output, name, module):
                    return  # a built-in probe failed: this module is no longer watched
            if on_grad and ctx.disabled:
                on_grad = tuple(p for p in on_grad if f"<probe {p.name}>" not in ctx.disabled)
            if on_grad:
                call = buffer.call_index
                for where, _, tensor in ctx.outputs(name, output):
                    if tensor.requires_grad:
                        # A partial, not a closure: two Python objects per output, not nine.
                        tensor.register_hook(partial(self._on_output_grad, buffer, module, where, on_grad, call))
        except ProbeError:  # strict=True: the user asked for it to surface
            raise
        except Exception as e:
            ctx.disable(name, module, e)
        finally:
            ctx.forget_output()
            buffer.call_args = None

    def _output_grad(
        self,
        buffer: StepBuffer,
        module: nn.Module,
        where: str,
        probes: tuple[Probe, ...],
        call: int,
        grad: torch.Tensor | None,
    ) -> None:
        """The gradient w.r.t. output ``where`` of call ``call`` arrived (the tensor hook)."""
        ctx = self.ctx
        if buffer.closed or ctx.closing or where in ctx.disabled:
            return None
        buffer.call_index = call
        # None: no gradient reached this output (one of a node's several outputs, unused).
        for probe in probes if grad is not None else ():
            if not self._send(probe, probe.on_output_grad, where, module, grad, where, None):
                return None
        self._backward_reached(buffer)
        return None

    def _send(
        self,
        probe: Probe,
        method: Callable[..., Any],
        where: str,
        module: nn.Module,
        value: Any,
        disable_key: str,
        disable_module: nn.Module | None,
    ) -> bool:
        """One per-module event to one probe, its scalars recorded; False when a built-in probe
        failed (the module is disabled), True otherwise (a failing user probe is disabled alone)."""
        try:
            result = method(where, module, value)
            if result:
                self._record(probe, where, result)
        except ProbeError:
            raise
        except Exception as e:
            if probe.builtin:
                self.ctx.disable(disable_key, disable_module, e)
                return False
            self.ctx.disable_probe(probe, where, module, e)
        return True

    def _record(self, probe: Probe, where: str, values: Mapping[str, Any]) -> None:
        """A user probe's values as this step's scalars ``{probe}/{key}/{module}``."""
        buffer = self.ctx.buffer
        if buffer is None:
            return
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                buffer.add_scalar(probe_tag(probe.name, key, where), value.detach().reshape(()).float())
            else:
                buffer.add_plain_scalar(probe_tag(probe.name, key, where), float(value))

    # ----------------------------------------------------------------- backward
    def _param_grad(self, name: str, param: torch.Tensor) -> None:
        """A parameter's gradient was accumulated, on a step whose probes take them."""
        buffer = self._grad_buffer
        if buffer is None or buffer.closed or param.grad is None:
            return None
        for probe in self._grad_takers:
            probe.on_param_grad(name, param)
        self._backward_reached(buffer)
        return None

    def _backward_reached(self, buffer: StepBuffer) -> None:
        """A backward of the open step is under way: its end-of-backward callback, once."""
        if buffer.callback_queued or not (
            buffer.logging or self.events["on_after_backward"] or self.events["on_after_reduction"]
        ):
            return
        if self.ctx.compiled and compiled_autograd_enabled():
            # Compiled autograd refuses a backward callback (torch 2.14): no end-of-backward events
            # there; the sentinel reads before the optimizer step instead.
            return
        buffer.callback_queued = True
        queue_after_backward(lambda: self._after_backward(buffer))

    def _after_backward(self, buffer: StepBuffer) -> None:
        """Runs when a backward pass finishes, before the user's next line (``optimizer.step()``)."""
        buffer.callback_queued = False
        if buffer.closed or self.ctx.closing:
            return
        buffer.settle()  # the gradients: before clipping or unscaling changes them in place
        for probe in self.events["on_after_backward"]:
            probe.on_after_backward()
        if buffer.ddp_sync or self.ctx.shards is not None:
            # Queued from this callback, it runs after the ones queued during backward: DDP's and
            # FSDP's end-of-backward reduction among them.
            queue_after_backward(lambda: self._after_reduction(buffer))
        else:
            self._after_reduction(buffer)

    def _after_reduction(self, buffer: StepBuffer) -> None:
        """The gradients of the backward that just finished are final."""
        if buffer.closed or self.ctx.closing:
            return
        for probe in self.events["on_after_reduction"]:
            probe.on_after_reduction()

"""The non-finite check: the first module whose output (or, in backward, whose input gradient)
holds NaN/Inf, on every checked step.

Each watched output is summed on the device (a sum is finite exactly when every value is, barring
overflow), as are the inputs no watched module produced and the gradients flowing back; the sums
cross to the host once per backward (or at the end of a step without one), and
:func:`introspect.debugger.origins.locate_nonfinite` names the origin from which sums went bad in
which order. Parameter-free modules that map finite values to finite values (``FINITE_PRESERVING``)
are not summed: their outputs are finite exactly when their inputs are.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ...debugger.alerts import Alert
from ...debugger.origins import CallRecord, blame_nonfinite_weights, locate_nonfinite
from ...errors import NonFiniteError, NonFiniteWarning, warn
from ...records.shards import local_view
from ...records.step import Check, HostStep, StepBuffer
from ...records.tags import tag
from ...runtime.amp import LOW_PRECISION, overflow_note, scaler_overflow
from ...runtime.distributed import nonfinite_on_rank, rank_and_world
from ...runtime.tensors import named_float_tensors
from ..base import Probe, ProbeContext, StepPlan
from ..moe import fused_expert_count
from .rank import RankOrigin

__all__ = ["NonFiniteCheck", "NonFiniteNumbers", "CallLedger", "NonFiniteReport", "FINITE_PRESERVING"]

FINITE_PRESERVING = frozenset(
    {
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "Sigmoid",
        "Tanh",
        "Softsign",
        "Tanhshrink",
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AdaptiveMaxPool1d",
        "AdaptiveMaxPool2d",
        "AdaptiveMaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveAvgPool3d",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "AlphaDropout",
        "FeatureAlphaDropout",
        "Flatten",
        "Unflatten",
        "Identity",
        "ZeroPad1d",
        "ZeroPad2d",
        "ZeroPad3d",
    }
)
"""Parameter-free modules whose forward and backward map finite values to finite values (short of
float overflow): the non-finite check need not sum their outputs or the gradients they receive."""


class CallLedger:
    """The per-module ledger of the non-finite check, written into one :class:`StepBuffer`: each
    watched call in order, which earlier call produced each of its inputs, and one device sum per
    output, per input no watched module produced, and per output gradient. The every-step check
    (``check_mode="per_module"``) keeps it on every checked step; the sentinel's replay keeps it
    for the replayed step only. :func:`introspect.debugger.origins.locate_nonfinite` reads it."""

    def __init__(self, module_types: dict[str, str]) -> None:
        self.types = dict(module_types)
        self.safe = {name: t in FINITE_PRESERVING for name, t in self.types.items()}
        self.half_outputs: dict[str, torch.dtype] = {}  # float16/bfloat16 outputs, for overflow notes

    def model_inputs(self, buffer: StepBuffer, args: tuple, kwargs: dict) -> None:
        """The model's own inputs: a NaN already in the batch is the data's, not a module's."""
        inputs = (
            [("", args[0])]
            if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
            else named_float_tensors((args, kwargs))
        )
        for _, tensor in inputs:
            if tensor.is_floating_point():
                buffer.add_check(Check("model_in"), tensor)
                buffer.mark_output(tensor, -1)

    def output(self, buffer: StepBuffer, name: str, args: Any, outputs: list[tuple[str, str, torch.Tensor]]) -> int:
        """One call of ``name`` that read ``args`` and returned ``outputs`` (``ctx.outputs``);
        returns its number, under which its output gradients are checked."""
        safe = self.safe[name]
        call = buffer.new_call(CallRecord(name, self.types[name], safe=safe))
        for _, tensor in named_float_tensors(args):
            producer = buffer.producer_of(tensor)
            if producer is None:
                buffer.add_check(Check("in", call), tensor)
            elif producer >= 0:
                buffer.calls[call].producers.append(producer)
        for where, _, tensor in outputs:
            if tensor.dtype in LOW_PRECISION:
                self.half_outputs[where] = tensor.dtype
            if not safe:
                buffer.remember_sum(tensor, buffer.add_check(Check("out", call, where), tensor))
            buffer.mark_output(tensor, call)
        return call

    def model_outputs(self, buffer: StepBuffer, output: Any) -> None:
        """Mark the calls whose outputs the model returned (a NaN gradient arriving there came
        from the loss, not from code between modules)."""
        for _, tensor in named_float_tensors(output):
            producer = buffer.producer_of(tensor)
            if producer is not None and producer >= 0:
                buffer.calls[producer].model_output = True

    def output_grad(self, buffer: StepBuffer, call: int, where: str, grad: torch.Tensor) -> None:
        if buffer.checking and buffer.grad_check_needed(call):
            buffer.remember_sum(grad, buffer.add_check(Check("grad", call, where), grad))


class NonFiniteReport:
    """What the check does with an origin it found: the same for both modes. A backward NaN/Inf
    under GradScaler is the routine overflow; a forward one at a module whose own weights are
    non-finite blames the weights; the finding is recorded once, the next step is logged, and
    ``on_nonfinite`` decides between a warning (once per origin), a raise and nothing."""

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx

    def __call__(
        self, buffer: StepBuffer, alert: Alert, may_raise: bool, half_outputs: dict[str, torch.dtype]
    ) -> Alert | None:
        """``alert``: the origin found in ``buffer``'s step."""
        ctx = self.ctx
        if alert.phase == "backward" and ctx.grad_scale() is not None:
            buffer.grads_overflowed = True
            ctx.findings.add(scaler_overflow(alert, ctx.config.grad_scaler))  # routine: the scaler skips the step
            return None
        if alert.phase == "forward":
            alert = blame_nonfinite_weights(alert, self._nonfinite_weights(alert.where), ctx.findings.alerts)
        alert = nonfinite_on_rank(overflow_note(alert, half_outputs.get(alert.where)))
        # An escalation: the next steps' histograms, NaN counts included (at least the next one).
        ctx.force_log(max(1, int(ctx.config.thresholds.escalate_steps)))
        new = ctx.findings.add(alert)
        action = ctx.config.on_nonfinite
        if action == "raise" and may_raise:
            raise NonFiniteError(f"introspect: step {alert.step}: {alert.message}", alert)
        if new and action == "warn":  # new: once per origin
            warn(f"introspect: step {alert.step}: {alert.message}", NonFiniteWarning)
        return alert

    def _nonfinite_weights(self, where: str) -> dict[str, SimpleNamespace]:
        """``weights/{param}`` -> NaN/Inf count of the origin module's own parameters, read on
        this (firing) path only: an origin whose weights are already NaN is not the culprit."""
        name = where.split("/")[0]
        module = self.ctx.modules.get(name)
        found: dict[str, SimpleNamespace] = {}
        if module is None:
            return found
        owners = dict(module.named_modules(prefix=name))
        for param_name, param in module.named_parameters(prefix=name):
            if param.is_floating_point():
                # This rank's shard only: a DTensor reduction here would be a collective that
                # the ranks without a NaN never join.
                bad = ~torch.isfinite(local_view(param.detach()))
                count = int(bad.sum())
                if count:
                    # Fused experts (one (E, ...) parameter for all): which experts' slices.
                    fused = fused_expert_count(owners.get(param_name.rpartition(".")[0], module))
                    experts = bad.flatten(1).any(1).nonzero().flatten().tolist() if fused and bad.dim() >= 3 else []
                    found[tag("weights", param_name)] = SimpleNamespace(
                        nonfinite=float(count), numel=param.numel(), experts=experts
                    )
        return found


class NonFiniteCheck(Probe):
    """``check_mode="per_module"``: the ledger on every checked step, read once per backward (or
    at the end of a step without one). For steps that cannot be replayed (see
    :mod:`introspect.probes.nonfinite.sentinel`); it costs a sum per watched output and output gradient.
    Off while the model runs compiled: the graph calls no per-module hook, and the sentinel
    stands in (it sees the outputs and gradients, and replays the step eagerly where it can)."""

    name = "nonfinite"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._ledger = CallLedger(ctx.module_types)
        self._report = NonFiniteReport(ctx)
        self._rank = RankOrigin(ctx)

    def active(self, plan: StepPlan) -> bool:
        return plan.checking and not self.ctx.compiled

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        if self.ctx.buffer is not None:
            self._ledger.model_inputs(self.ctx.buffer, args, kwargs)

    def on_forward_end(self, output: Any) -> None:
        if output is not None and self.ctx.buffer is not None:
            self._ledger.model_outputs(self.ctx.buffer, output)

    def on_output(self, name: str, module: nn.Module, output: Any) -> None:
        buffer = self.ctx.buffer
        if buffer is not None:
            # The output-gradient hooks of this call check under its number.
            buffer.call_index = self._ledger.output(buffer, name, buffer.call_args, self.ctx.outputs(name, output))
        return None

    def on_output_grad(self, name: str, module: nn.Module, grad: torch.Tensor) -> None:
        buffer = self.ctx.buffer
        if buffer is not None:
            self._ledger.output_grad(buffer, buffer.call_index, name, grad)
        return None

    def on_after_reduction(self) -> None:
        """The check, once the gradients are final: under DDP on the averaged gradients, and a
        raise here cannot stop DDP from finishing its reduction (the next forward needs it)."""
        buffer = self.ctx.buffer
        if buffer is None:
            return
        sharded = self.ctx.shards is not None and rank_and_world()[1] > 1
        if buffer.ddp_sync or sharded:
            self._after_ddp_reduction(buffer, sharded)
        else:
            self.check(buffer, may_raise=True)

    def _after_ddp_reduction(self, buffer: StepBuffer, sharded: bool = False) -> None:
        """Under DDP (or FSDP2, ``sharded``): this rank's check, plus which rank a NaN in the
        reduced gradients came from."""
        pending = self._rank.add_reduced_check(buffer)
        local = self.check(buffer, may_raise=False)
        alert = self._rank.exchange(buffer, local, sharded) if pending else None
        if alert is not None:
            self.ctx.findings.add(alert)
            local = local or alert
        if local is not None and self.ctx.config.on_nonfinite == "raise":
            raise NonFiniteError(f"introspect: step {local.step}: {local.message}", local)

    def on_step_end(self, host: HostStep | None) -> None:
        buffer = self.ctx.buffer
        if buffer is not None:
            self.check(buffer, may_raise=not self.ctx.closing)

    def check(self, buffer: StepBuffer, may_raise: bool) -> Alert | None:
        """The step's NaN/Inf origin, reported (None when there is none, or it was a scaler overflow)."""
        if buffer.reported or not buffer.sync_checks():
            return None
        alert = locate_nonfinite(buffer.step, buffer.calls, buffer.check_labels, buffer.check_values)
        if alert is None:
            return None
        buffer.reported = True
        return self._report(buffer, alert, may_raise, self._ledger.half_outputs)


class NonFiniteNumbers(Probe):
    """Put numbers on a NaN/Inf finding from a logged step's histograms: its own step when that
    was a logging step, else the step after it (always logged). The tensors themselves are gone
    by the time the per-step check speaks, and keeping them would cost every step."""

    name = "nonfinite_numbers"
    builtin = True

    def on_step_end(self, host: HostStep | None) -> None:
        buffer = self.ctx.buffer
        if host is None or buffer is None:
            return
        for alert in self.ctx.findings.alerts:
            if alert.kind != "nonfinite" or "nonfinite_values" in alert.numbers:
                continue
            if alert.step not in (host.step, host.step - 1) or alert.where == "input":
                continue
            module = alert.where.split("/")[0]
            calls = [c for c in buffer.calls if c.module == module]
            producers = [buffer.calls[p].module for p in calls[0].producers] if calls else []
            kind = "activations" if alert.phase == "forward" else "activation_grads"
            # Forward: the origin's output, and what it read. Backward: the gradient the culprit
            # passed back (at its producer's output), and the gradient it received.
            bad, upstream = (
                (alert.where, producers[:1])
                if alert.phase == "forward"
                else ((producers[:1] or [alert.where])[0], [alert.where])
            )
            record = host.histograms.get(tag(kind, bad))
            if record is None or record.nonfinite <= 0:
                continue
            numbers = {"at_step": float(host.step), "nonfinite_values": record.nonfinite, "values": float(record.numel)}
            if record.finite_count > 0:
                numbers.update(finite_min=record.min, finite_max=record.max)
            source = host.histograms.get(tag(kind, upstream[0])) if upstream else None
            if source is not None and source.nonfinite == 0 and source.finite_count > 0:
                numbers.update(upstream_min=source.min, upstream_max=source.max)
            alert.numbers.update(numbers)

"""The non-finite sentinel (``check_mode="replay"``, the default): one cheap look per step, and a
replay of the step only when it sees NaN/Inf.

Per checked step the sentinel takes the L2 norm of

* each floating tensor of the model's output, at the end of the forward;
* the gradient arriving at each of them (one hook per output), and every parameter gradient,
  at the end of backward (all in one ``_foreach_norm``);

and reads them in one host transfer at the end of backward (after DDP's averaging under DDP),
or at the end of a step that had none. A norm is finite exactly when every value is, short of
values near 1e19. The parameter gradients' norms give the global gradient norm too, which the
gradient-norm spike score reads (:mod:`introspect.probes.grad_spike`), at no extra cost.

When a norm is not finite the step is replayed (:mod:`introspect.probes.nonfinite.replay`) with the per-module
check on every watched module, which names the origin exactly as ``check_mode="per_module"``
would have on that step, with the counts and ranges of the bad values added. Before the replay
the sentinel has not held on to anything but the forward's inputs (by reference), its RNG state
and the output gradient, all released when the step is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._torch import compiled_autograd_enabled, foreach_norm, tensor_version
from ...debugger.alerts import Alert
from ...errors import NonFiniteError
from ...records import step as step_records
from ...records.shards import local_view
from ...records.step import HostStep, StepBuffer
from ...records.tags import tag
from ...runtime.distributed import rank_and_world
from ...runtime.preserved import cuda_devices
from ..base import Probe, ProbeContext, StepPlan, WatchOptions
from .jumps import JumpEscalation, fused_qk_slices
from .norms import PACK_LIMIT, FlatLayout, packed_norm, packed_norms
from .per_module import CallLedger, NonFiniteReport
from .rank import RankOrigin
from .replay import ForwardRecord, capture_forward, replay_step

__all__ = [
    "NonFiniteSentinel",
    "DeferredReads",
    "check_mode_for",
    "replay_possible",
    "fused_qk_slices",
    "HOLD_OUTPUT_BYTES",
]

HOLD_OUTPUT_BYTES = 16 * 2**20
"""Model outputs up to this size are held until the step's read and reduced with the gradients
in one fused norm; bigger ones are reduced at the end of the forward and only their norm kept."""


@dataclass
class _Read:
    """One read of the sentinel's norms, and what its verdict needs: ``[outputs' norms, output
    gradients' norms, parameter gradients' norms (each, or one packed norm), scale]``."""

    buffer: StepBuffer
    records: list[ForwardRecord]
    out_names: list[str]
    n_out: int
    n_grad: int
    n_param: int
    per_param: bool
    backward: bool
    n_slice: int
    scaled: bool
    reduced: bool
    moved: bool
    late: bool = False
    """The verdict came after optimizer.step() moved the weights (a deferred CUDA read)."""
    host: torch.Tensor | None = None
    event: Any = None
    versions: list[int] | None = None
    param_names: list[str] | None = None
    """The parameters whose gradients were read, in order (a deferred read's)."""


class DeferredReads:
    """CUDA: a read that does not block. The norms go to pinned host memory without blocking, and
    the verdict (``verdict(read, values)``) comes once they are there (:meth:`settle`), by the next
    step at the latest: training never waits on the sentinel. Whether optimizer.step() moved the
    weights before the verdict (a replay would then run another model than the step did) is told
    by the parameters' (``tensors``) in-place versions."""

    def __init__(self, tensors: Sequence[torch.Tensor], verdict: Callable[[_Read, list[float]], None]) -> None:
        self._tensors = tensors
        self._verdict = verdict
        self.pending: _Read | None = None
        """The read in flight (one at a time)."""

    def possible(self, grads: list[torch.Tensor], reduced: bool, unhooked: bool, on_nonfinite: str) -> bool:
        """Not under ``on_nonfinite="raise"`` (its promise: raise before ``optimizer.step()``), nor
        under DDP (every rank reads at once, for the rank exchange), nor when the gradients are
        read before the update anyway (``unhooked``: compiled autograd)."""
        return (
            bool(grads)
            and grads[0].is_cuda
            and not reduced
            and not unhooked
            and on_nonfinite != "raise"
            and all(g.device == grads[0].device for g in grads)
        )

    def start(self, read: _Read, parts: list[torch.Tensor]) -> None:
        self.settle(wait=True)  # (one read in flight at a time)
        values = torch.stack(parts)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        read.host, read.event = host, event
        read.versions = [tensor_version(p) for p in self._tensors]  # compared when the verdict comes
        self.pending = read

    def settle(self, wait: bool) -> None:
        """The deferred verdict, if its copy has landed (``wait``: wait for it; the GPU has had a
        step's time, so this rarely waits)."""
        read = self.pending
        if read is None or read.event is None or read.host is None:
            return
        if not wait and not read.event.query():
            return
        self.pending = None
        read.event.synchronize()
        if read.versions is not None and not read.moved:
            read.moved = any(tensor_version(p) != v for p, v in zip(self._tensors, read.versions))
            read.late = read.moved
        self._verdict(read, read.host.tolist())


def replay_possible(ctx: ProbeContext) -> bool:
    """Whether a step can be replayed on this rank alone. A replay of a sharded forward (FSDP's
    all-gathers) or of SyncBatchNorm under torch.distributed would be a collective that the ranks
    whose step was finite never join."""
    if ctx.shards is not None:
        return False
    return not (rank_and_world()[1] > 1 and any(isinstance(m, nn.SyncBatchNorm) for m in ctx.root.modules()))


def check_mode_for(config: WatchOptions, root: nn.Module, sharded: bool) -> str:
    """ "replay", "per_module" or "off". A replay of a sharded forward (FSDP's all-gathers) or of
    SyncBatchNorm under torch.distributed would be a collective that the ranks whose step was
    finite never join; those models get the per-module check whatever ``check_mode`` says."""
    if config.check_every == 0:
        return "off"
    if config.check_mode == "per_module" or sharded:
        return "per_module"
    if rank_and_world()[1] > 1 and any(isinstance(m, nn.SyncBatchNorm) for m in root.modules()):
        return "per_module"
    return "replay"


class NonFiniteSentinel(Probe):
    """The sentinel of ``check_mode="replay"``; under ``check_mode="per_module"`` it stands in
    for the per-module check while the model runs compiled (``compiled_only``): a compiled graph
    runs no per-module hook, so the sentinel's norms are all that can see a NaN there, and its
    eager replay (where one is possible) names the layer."""

    name = "nonfinite"
    builtin = True

    def __init__(self, compiled_only: bool = False) -> None:
        self.compiled_only = compiled_only

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._replays = replay_possible(ctx)
        self._report = NonFiniteReport(ctx)
        self._rank = RankOrigin(ctx)
        self._devices = cuda_devices(ctx.root)
        self._params = [(n, p) for n, p in ctx.root.named_parameters() if p.requires_grad]
        self._tensors = [p for _, p in self._params]
        self._all_small = all(p.numel() <= PACK_LIMIT for p in self._tensors)  # (their gradients too)
        self._dtensors = any(type(p).__name__ == "DTensor" for _, p in self._params)
        # Every parameter non-empty: the flat copy's layout is known now.
        self._layout = FlatLayout.of(self._tensors) if not self._dtensors else None
        self._local: Alert | None = None  # this step's own finding, for the rank exchange
        self._stale: set[str] = set()  # parameters whose .grad an earlier backward left non-finite
        # Fused q|k|v projections' query/key parts are not read on sharded gradients (a shard's
        # slice is not the projection's).
        self._jumps = JumpEscalation(ctx, self._params, sharded=bool(self._dtensors or ctx.shards))
        self._deferred = DeferredReads(self._tensors, self._verdict)  # CUDA: reads in flight
        self._clear()

    def _clear(self) -> None:
        self._records: list[ForwardRecord] = []
        self._outputs: list[torch.Tensor] = []  # held outputs, or the norms of those too big to hold
        self._out_names: list[str] = []
        self._unhooked = False  # outputs not hooked (compiled autograd): .grad read before the update
        self._versions: list[int] = []  # then the parameters' in-place versions at the forward's end

    def active(self, plan: StepPlan) -> bool:
        return plan.checking and (self.ctx.compiled or not self.compiled_only)

    def on_step_start(self, plan: StepPlan) -> None:
        self._deferred.settle(wait=False)  # the previous step's verdict, if its copy has landed
        self._clear()
        self._local = None

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        self._records.append(capture_forward(args, kwargs, self._devices))

    def on_forward_end(self, output: Any) -> None:
        buffer = self.ctx.buffer
        if output is None or buffer is None or not self._records:
            return
        tensors = self.ctx.tensors(output)  # the one walk of the output, shared with the watcher
        if not tensors:
            return
        record = self._records[-1]
        # Compiled autograd fails on a hook whose output gets no gradient: there the gradients are
        # read before the optimizer step (or at the step's end), and the replay has none to push back.
        hooks = not (self.ctx.compiled and compiled_autograd_enabled())
        if not hooks:
            self._unhooked, self._versions = True, [tensor_version(p) for p in self._tensors]
        for index, (suffix, tensor) in enumerate(tensors):
            self._out_names.append(suffix)
            # A small output is held (it is usually alive through backward anyway) and joins the
            # read's one fused norm; a big one (LLM logits) is reduced now, not kept: the norm of
            # its (0-dim) norm is that norm again, so it joins the fused norm all the same.
            held = tensor.detach()
            if tensor.numel() * tensor.element_size() > HOLD_OUTPUT_BYTES:
                held = foreach_norm([held], torch.float32)[0]
            self._outputs.append(held)
            if hooks and tensor.requires_grad:
                tensor.register_hook(self._output_grad_hook(buffer, record, index))

    def _output_grad_hook(self, buffer: StepBuffer, record: ForwardRecord, index: int) -> Any:
        def hook(grad: torch.Tensor | None) -> None:
            # None: no gradient reached this output (an output of a node that has several, the
            # loss's being used alone: a compiled graph's, a split's). Backward ran all the same.
            if grad is not None and not (buffer.closed or self.ctx.closing):
                record.grads[index] = grad  # by reference: what the replay pushes back

        return hook

    def on_after_reduction(self) -> None:
        """The read, once the gradients are final: under DDP the averaged ones, and a raise here
        cannot stop DDP from finishing its reduction (the next forward needs it)."""
        buffer = self.ctx.buffer
        if buffer is not None:
            self._read(buffer, backward=True, reduced=buffer.ddp_sync)

    def on_before_optimizer_step(self) -> None:
        """Unhooked (compiled autograd): the gradients are complete and the weights not yet moved.
        A deferred CUDA read whose copy has landed is judged here, while a replay is still exact."""
        self._deferred.settle(wait=False)
        buffer = self.ctx.buffer
        if self._unhooked and buffer is not None and (self._records or self._outputs):
            self._read(buffer, backward=True)

    def on_step_end(self, host: HostStep | None) -> None:
        buffer = self.ctx.buffer
        if buffer is not None and (self._records or self._outputs):
            self._read(buffer, backward=self._unhooked)
        self._deferred.settle(wait=False)

    def on_close(self, failed: bool) -> None:
        self._deferred.settle(wait=True)
        self._deferred.pending = None

    def _weights_moved(self) -> bool:
        """Unhooked and read at the step's end: the optimizer updated the weights since the
        forward, so a replay would run another model than the step did."""
        return self._unhooked and any(tensor_version(p) != v for p, v in zip(self._tensors, self._versions))

    # ----------------------------------------------------------------- the one read
    def _read(self, buffer: StepBuffer, backward: bool, reduced: bool = False) -> None:
        records, outputs, out_names = self._records, self._outputs, self._out_names
        moved = self._weights_moved()
        self._clear()
        out_grads = [g for r in records for g in r.grads.values() if g is not None]
        grads = [g for p in self._tensors if (g := p.grad) is not None] if backward else []
        if self._dtensors:
            grads = [local_view(g) for g in grads]
        heads = outputs + out_grads  # a few tensors, whatever the model's size
        parts = foreach_norm(heads, torch.float32) if heads else []
        scale = self.ctx.grad_scale() if grads else None
        deferred = self._deferred.possible(grads, reduced, self._unhooked, self.ctx.config.on_nonfinite)
        per_param = False
        complete = len(grads) == len(self._tensors)
        # The q/k parts of fused projections: a kernel or two and one norm each (a few per model).
        slices = self._jumps.slice_views(grads) if complete else []
        if grads and deferred:  # CUDA: one fused launch for every gradient's norm, all copied
            parts += foreach_norm(grads, torch.float32)
            parts += foreach_norm(slices, torch.float32) if slices else []
            per_param = True
        elif grads and self._jumps.per_param:  # each parameter's own norm: the jump detector's input
            parts.append(packed_norms(grads, layout=self._layout if complete else None))
            if slices:
                parts.append(torch.stack(foreach_norm(slices, torch.float32)))
            per_param = True
        elif grads:
            parts.append(packed_norm(grads, all_small=self._all_small))
        if scale is not None:
            parts.append(scale.reshape(()).float())
        if not parts:
            return
        read = _Read(
            buffer=buffer,
            records=records,
            out_names=out_names,
            n_out=len(outputs),
            n_grad=len(out_grads),
            n_param=len(grads) if per_param else (1 if grads else 0),
            per_param=per_param,
            backward=backward,
            n_slice=len(slices) if per_param else 0,
            scaled=scale is not None,
            reduced=reduced,
            moved=moved,
        )
        if deferred:
            # Named now: by the verdict a zero_grad(set_to_none=True) may have emptied .grad.
            read.param_names = [n for n, p in self._params if p.grad is not None]
            self._deferred.start(read, parts)
            return
        self._verdict(read, step_records.one_transfer(parts))

    # ----------------------------------------------------------------- the verdict
    def _verdict(self, read: _Read, values: list[float]) -> None:
        buffer = read.buffer
        scale_value = values.pop() if read.scaled else 1.0
        slice_norms = values[len(values) - read.n_slice :] if read.n_slice else []
        if read.n_slice:  # (not the parameters' own: no part of the global norm)
            del values[len(values) - read.n_slice :]
        n_out, n_grad = read.n_out, read.n_grad
        param_norms = values[n_out + n_grad :]
        if param_norms:  # the last backward of the step wins (gradient accumulation)
            buffer.grad_norm = math.sqrt(math.fsum(v * v for v in param_norms)) / scale_value
        if math.isfinite(sum(values)):
            if param_norms:
                self._stale = set()
                if read.per_param:  # (one packed norm says nothing of one parameter's jump)
                    self._escalate_on_jumps(buffer, param_norms + slice_norms, values[:n_out], read)
                elif self._jumps.loss_judged:
                    self._escalate_on_jumps(buffer, [], values[:n_out], read)
            return
        params: list[tuple[str, torch.Tensor | None]]
        if read.param_names is not None:  # a deferred read: the gradients it read, if still there
            now = {n: p.grad for n, p in self._params} if not read.late else {}
            params = [(n, now.get(n)) for n in read.param_names]
        else:
            params = [(n, p.grad) for n, p in self._params if p.grad is not None] if read.backward else []
        if param_norms and not read.per_param:
            # The packed norm fired (or overflowed): each gradient's own norm, on this path only.
            grads = [local_view(g) if self._dtensors else g for _, g in params if g is not None]
            param_norms = step_records.one_transfer(foreach_norm(grads, torch.float32)) if grads else []
            values = values[: n_out + n_grad] + param_norms
            buffer.grad_norm = math.sqrt(math.fsum(v * v for v in param_norms)) / scale_value
        bad_params = [
            (name, grad)
            for (name, grad), v in zip(params, param_norms)
            if not math.isfinite(v) and not (grad is not None and math.isinf(v) and bool(torch.isfinite(grad).all()))
        ]  # an Inf norm of finite values (each near 1e19) is no NaN: the one extra read is on this path only
        sighting = Sighting(
            outputs=[n for n, v in zip(read.out_names, values[:n_out]) if not math.isfinite(v)],
            output_grad=not all(math.isfinite(v) for v in values[n_out : n_out + n_grad]),
            params=[name for name, _ in bad_params],
            nan=any(math.isnan(v) for v in values),
        )
        if sighting.empty or (sighting.only_params and set(sighting.params) <= self._stale):
            return  # (gradients left non-finite by an earlier backward, not zeroed since: known)
        reduced, records = read.reduced, read.records
        if not buffer.reported:  # once per step: the first read that fires
            buffer.reported = True
            self._local = self._locate(buffer, records, sighting, reduced, read.moved, read.late)
        if not reduced:
            return
        # Under DDP every rank reads the same averaged gradients, so every rank gets here at once.
        local = self._local
        if sighting.params and not self._rank.done:
            rank_alert = self._rank.exchange_reduced(buffer.step, local)
            self.ctx.findings.add(rank_alert)
            local = local or rank_alert
        if local is not None and self.ctx.config.on_nonfinite == "raise":
            raise NonFiniteError(f"introspect: step {local.step}: {local.message}", local)

    def _record_counts(self, buffer: StepBuffer, counts: dict[str, float]) -> None:
        """The replay's per-output NaN/Inf counts at the step it replayed: ``nonfinite/{module}``
        scalars off the cadence (a logging step writes its own from its histograms), and on the
        buffer for the live health map. By the next (forced) logging step every layer is NaN;
        only this step shows where it began."""
        buffer.nonfinite_counts = counts
        if buffer.logging or not self.ctx.writer:
            return
        for where, count in counts.items():
            self.ctx.writer.call("add_scalar", tag("nonfinite", where), count, buffer.step)

    def _escalate_on_jumps(
        self, buffer: StepBuffer, param_norms: list[float], out_values: list[float], read: _Read
    ) -> None:
        """The escalation on this read's host numbers (see :class:`JumpEscalation`), with the names
        of the norms it holds."""
        if read.param_names is not None:  # a deferred read: the parameters it read
            names: tuple[str, ...] | None = tuple(read.param_names)
        else:
            names = None  # every gradient (and the fused q/k parts), or those with one now
        self._jumps.judge(buffer, param_norms, names, bool(read.n_slice), read.out_names, out_values)

    @property
    def escalations(self) -> int:
        """How many times this sentinel's own numbers escalated (a parameter's or the loss's jump;
        granted escalations only, see ``Thresholds.escalate_share``)."""
        return self._jumps.escalations

    def _locate(
        self,
        buffer: StepBuffer,
        records: list[ForwardRecord],
        sighting: Sighting,
        reduced: bool,
        moved: bool,
        late: bool = False,
    ) -> Alert | None:
        """Replay the step and report its origin (a raise waits for the rank exchange under DDP)."""
        ctx = self.ctx
        replays = bool(records) and self._replays and not moved
        outcome = replay_step(ctx, records, CallLedger(ctx.module_types), buffer.step) if replays else None
        alert = outcome.alert if outcome is not None else None
        if outcome is not None and outcome.nonfinite_counts:
            self._record_counts(buffer, outcome.nonfinite_counts)
        if outcome is not None and alert is not None and sighting.outputs and alert.phase != "forward":
            # The replayed forward was finite where the real one was not: the backward finding
            # it made instead comes from the captured (NaN) output gradient, not from the model.
            alert, outcome.reason = (
                None,
                "its forward came out finite (state the forward changes, a counter or a cache?)",
            )
        if alert is None and sighting.only_params and outcome is not None and outcome.own_gradients_finite:
            # This step's own gradients are finite: .grad holds an earlier backward's NaN/Inf,
            # accumulated into since (no zero_grad). Reported once, unless an earlier finding
            # already named where it came from; later steps are not replayed for it again.
            # Under DDP they are the averaged gradients: another rank's (the rank exchange says).
            self._stale = set(sighting.params)
            if reduced or any(a.kind == "nonfinite" for a in ctx.findings.alerts):
                return None
            alert = sighting.stale_alert(buffer.step)
        if alert is None and not (reduced and sighting.only_params):
            # Under DDP a NaN in the averaged gradients alone may be another rank's: the rank
            # exchange says whose. Anything else the replay could not pin down is reported as
            # the sentinel saw it.
            if outcome is not None and outcome.reason:
                reason = outcome.reason
            elif late:
                reason = (
                    "on CUDA the sentinel reads its norms without blocking, and they came after optimizer.step() "
                    "moved the weights (on_nonfinite='raise' reads them before it, and names the layer)"
                )
            elif moved:
                reason = (
                    "under compiled autograd its gradients could only be read after optimizer.step() moved the "
                    "weights (watch(..., optimizer=) reads them before)"
                )
            elif records:
                reason = (
                    "a replay of a sharded or SyncBatchNorm forward would be a collective the other ranks never join"
                )
            else:
                reason = "no forward of this step was seen"
            alert = sighting.alert(buffer.step, reason, compiled=ctx.compiled)
        if alert is None:
            return None
        may_raise = not reduced and not ctx.closing and not late
        return self._report(buffer, alert, may_raise, outcome.half_outputs if outcome is not None else {})


@dataclass(frozen=True)
class Sighting:
    """What the sentinel saw, for the finding when the replay cannot name the origin: the
    non-finite outputs (by suffix), whether the gradient arriving at them was, the parameters
    whose gradients were, and whether any of it was NaN (else Inf)."""

    outputs: list[str]
    output_grad: bool
    params: list[str]
    nan: bool

    @property
    def empty(self) -> bool:
        return not (self.outputs or self.output_grad or self.params)

    @property
    def only_params(self) -> bool:
        return bool(self.params) and not (self.outputs or self.output_grad)

    def _params_text(self) -> str:
        more = f" and {len(self.params) - 3} more" if len(self.params) > 3 else ""
        return f"{', '.join(self.params[:3])}{more}"

    def stale_alert(self, step: int) -> Alert:
        what = "NaN" if self.nan else "Inf"
        return Alert(
            "nonfinite",
            self.params[0],
            step,
            f"{what} in .grad of {self._params_text()} comes from an earlier backward: this step's own "
            "gradients are finite, and .grad was not zeroed since (optimizer.zero_grad() each step?)",
            {"bad_parameters": float(len(self.params))},
            phase="backward",
        )

    def alert(self, step: int, reason: str, compiled: bool = False) -> Alert:
        what = "NaN" if self.nan else "Inf"
        if self.outputs:
            named = [o for o in self.outputs if o]
            where, phase = "output" + (f"/{named[0]}" if named else ""), "forward"
            seen = f"{what} in the model's output" + (f" {', '.join(named)}" if named else "")
        elif self.output_grad:
            where, phase = "output", "backward"
            seen = f"{what} in the gradient arriving at the model's output (the loss, or code after the model)"
        else:
            where, phase = self.params[0], "backward"
            seen = f"{what} in the gradients of {self._params_text()}"
        return Alert(
            "nonfinite",
            where,
            step,
            f"{seen}; the replay of this step could not name the layer: {reason}. "
            + (
                "A compiled graph runs no per-layer check: watch the uncompiled model to check every layer"
                if compiled
                else "check_mode='per_module' checks every layer on every step instead"
            ),
            {"bad_parameters": float(len(self.params))} if self.params else {},
            phase=phase,
        )

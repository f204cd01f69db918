"""Memory per module, and what held it when it ran out.

``log=[..., "memory"]`` (opt-in): on logging steps, the bytes each module's forward saved for
backward (``introspect.analysis.memory.SavedTally``: ``saved_tensors_hooks`` and a stack of the
running modules, set for that step only), the step's peak of live saved bytes and where it was
reached, parameters, gradients (read when backward ends) and, with ``optimizer=``, optimizer state
per module; on CUDA the allocator's ``max_memory_allocated`` and per-module deltas beside them.
Written as ``memory/saved/{module}`` scalars (a module's children included), ``memory/saved_peak``,
``memory/cuda_max_allocated`` and ``memory/cuda_reserved`` (CUDA), and the table ``model/memory``
(at the first measured step, printed too when ``summary=True``, and again whenever the predicted
peak moves by more than 5%). Off those steps nothing of this probe runs.

Every watch, whatever ``log``: when an out-of-memory error (``torch.OutOfMemoryError``,
``MemoryError``, a ``RuntimeError`` saying "out of memory") leaves the root's forward, or the
``with`` block, the finding ``out_of_memory`` says where it struck and what the step held: the
live saved bytes per module when the step was a measured one, else the last measured step's
(and which step that was), parameters, gradients and optimizer state now, and on CUDA allocated
against reserved. It costs nothing until then: the error's own traceback says which module's
forward it came out of, and the rest is read at that moment. The error itself goes on untouched
and is not kept.
"""

from __future__ import annotations

from typing import Any

import torch

from ..analysis.memory import (
    CudaMemory,
    SavedTally,
    StepMemory,
    cuda_device_of,
    is_out_of_memory,
    out_of_memory_alert,
    owned_tensors,
    raising_module,
    state_bytes,
)
from ..analysis.summary import summary_markdown
from ..errors import IntrospectError, IntrospectWarning, warn
from ..records.step import HostStep
from ..records.tags import MEMORY_TEXT_TAG, memory_tag
from ..runtime.selection import tagged_modules
from .base import Probe, ProbeContext, StepPlan

__all__ = ["MemoryProbe"]


class MemoryProbe(Probe):
    name = "memory"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self.measuring = "memory" in ctx.config.log
        self._modules = tagged_modules(ctx.root)
        self._names = {id(m): n for n, m in self._modules.items()}
        self._root = next(iter(self._modules))
        self._owned = owned_tensors(self._modules)
        self._written_peak = 0
        self._tally: SavedTally | None = None
        self._max_before: int | None = None
        self._grads: dict[str, int] | None = None
        self.last: StepMemory | None = None
        """The last measured step (kept as numbers only)."""
        self._printed = False
        self._warned = False
        self._reported: tuple[int, str] | None = None

    def active(self, plan: StepPlan) -> bool:
        return self.measuring and plan.logging and not self.ctx.compiled

    # ------------------------------------------------------------ a measured step
    def on_step_start(self, plan: StepPlan) -> None:
        device = cuda_device_of(self.ctx.root)
        tally = SavedTally(self._modules, cuda_device=device, owned=self._owned)
        tally.after_backward = lambda: self._after_backward(tally)
        self._max_before = torch.cuda.max_memory_allocated(device) if device is not None else None
        self._grads = None
        for handle in tally.module_hooks(skip=self.ctx.root):  # the root's own: on_forward / on_forward_end
            self.ctx.step_hooks.hook(handle)
        self._tally = tally

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        tally = self._tally
        if tally is None:
            return
        tally.new_forward()
        try:
            tally.start()
        except IntrospectError as e:
            self._tally = None
            if not self._warned:
                self._warned = True
                step = self.ctx.plan.step if self.ctx.plan is not None else "?"
                warn(f"introspect: memory not measured at step {step}: {e}", IntrospectWarning)
            return
        tally.enter(self._root)

    def on_forward_end(self, output: Any) -> None:
        tally = self._tally
        if tally is None or not tally.recording_now:
            return
        tally.leave(self._root)
        tally.stop()
        buffer = self.ctx.buffer
        assert buffer is not None  # a forward ends inside its open step
        saved = _with_children(tally.per_module(), self._root)
        for name in self.ctx.modules:
            if name in saved or name in tally.ran:
                buffer.add_plain_scalar(memory_tag("saved", name), float(saved.get(name, 0)))
        buffer.add_plain_scalar(memory_tag("saved_peak"), float(tally.peak))

    def _after_backward(self, tally: SavedTally) -> None:
        """The first backward through the step's saved tensors ended: the gradients are all there
        (a loop may drop them with ``zero_grad()`` before the step ends)."""
        if tally is not self._tally or self.ctx.closing:
            return
        self._grads = state_bytes(self._modules, owned=self._owned)[1]
        buffer = self.ctx.buffer
        if tally.cuda_device is not None and buffer is not None:
            cuda = CudaMemory.read(tally.cuda_device, self._max_before)
            if cuda.step_peak is not None:
                buffer.add_plain_scalar(memory_tag("cuda_max_allocated"), float(cuda.step_peak))
            buffer.add_plain_scalar(memory_tag("cuda_reserved"), float(cuda.reserved))

    def on_step_end(self, host: HostStep | None) -> None:
        tally, self._tally = self._tally, None
        if tally is None:
            return
        tally.stop()  # a forward that never reached its end (KeyboardInterrupt skips always_call hooks)
        optimizer = self.ctx.config.optimizer
        cuda = CudaMemory.read(tally.cuda_device, self._max_before) if tally.cuda_device is not None else None
        plan = self.ctx.plan
        step = StepMemory.from_tally(
            tally, optimizer, optimizer_known=optimizer is not None, cuda=cuda, step=plan.step if plan else None
        )
        if self._grads is not None:
            step.grads = self._grads
        self.last = step
        if host is None or abs(step.predicted_peak - self._written_peak) <= 0.05 * self._written_peak:
            return  # the table is written when it says something new: the first, and a peak 5% away
        self._written_peak = step.predicted_peak
        text = step.table()
        if self.ctx.config.summary and not self._printed:
            self._printed = True
            print(text)
        self.ctx.writer.call("add_text", MEMORY_TEXT_TAG, summary_markdown(text), host.step)

    def on_close(self, failed: bool) -> None:
        tally, self._tally = self._tally, None
        if tally is not None:
            tally.stop()

    # ------------------------------------------------------------ out of memory
    def on_error(self, error: BaseException) -> None:
        if not is_out_of_memory(error):
            return
        seen = (id(error), str(error)[:200])
        if seen == self._reported:
            return
        self._reported = seen
        ctx = self.ctx
        plan = ctx.plan
        tally = self._tally
        optimizer = ctx.config.optimizer
        params, grads, states = state_bytes(self._modules, optimizer, self._owned)
        device = cuda_device_of(ctx.root)
        alert = out_of_memory_alert(
            error,
            step=plan.step if plan is not None else ctx.clock.step,
            where=raising_module(error, self._names),
            root=self._root,
            params=sum(params.values()),
            grads=sum(grads.values()),
            optimizer=sum(states.values()) if optimizer is not None else None,
            saved_now={n: b for n, b in tally.live_by_module.items() if b > 0} if tally is not None else None,
            measured=self.last,
            cuda=CudaMemory.read(device, self._max_before if tally is not None else None)
            if device is not None
            else None,
        )
        ctx.findings.add(alert)


def _with_children(saved: dict[str, int], root: str) -> dict[str, int]:
    """Each module's bytes with its descendants' (dotted names), the root's being the total."""
    out: dict[str, int] = {}
    for name, nbytes in saved.items():
        if name == root:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            out[prefix] = out.get(prefix, 0) + nbytes
    out[root] = sum(saved.values())
    return out

"""Gradient-norm spikes: the global gradient norm of every checked step, scored against a rolling
window (OLMo 2's spike score: ≥ 7σ from the rolling mean, and from the mean of the last
``grad_spike_recent`` steps alone). Gradient-norm spikes come before loss spikes.

The norm costs nothing of its own with the default non-finite sentinel, which computes it from
the parameter-gradient norms it reads anyway (after DDP's averaging) and leaves it on the step's
buffer. Under ``check_mode="per_module"`` it joins that check's one per-step transfer as a check
of its own kind (``grad_norm``, which :func:`introspect.debugger.origins.locate_nonfinite` ignores),
added in ``on_after_reduction`` (on the gradients DDP averaged) before the check reads its sums
(this probe comes first in the dispatch order) and read after the check's sync. With the check
off, it rides in a logging step's transfer instead. On a spike, ``diagnostics/pre_spike`` gets the
per-module scalars of the last ``PRE_SPIKE_STEPS`` logging steps: what the model looked like before it.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .._torch import foreach_norm
from ..debugger.alerts import Alert
from ..records.shards import local_view
from ..records.step import Check, HostStep, StepBuffer
from ..records.tags import PRE_SPIKE_TAG
from ..runtime.selection import root_name
from .base import Probe, ProbeContext, StepPlan

__all__ = ["GradNormSpike", "PRE_SPIKE_STEPS", "spike_score"]

PRE_SPIKE_STEPS = 3
_LABEL = Check("grad_norm")
_MEASURE = "grad_norm/global"


def spike_score(value: float, window: deque[float] | list[float]) -> tuple[float, float, float]:
    """``(σ above the mean, mean, σ)`` of ``value`` against the earlier values in ``window``.

    Plain float sums (``math.fsum``), not ``statistics.pstdev``: that one sums exact fractions,
    ~0.4 ms for a window of 100, on every checked step."""
    n = len(window)
    mean = math.fsum(window) / n
    sigma = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / n)
    return ((value - mean) / sigma if sigma > 0 else (math.inf if value > mean else 0.0)), mean, sigma


class GradNormSpike(Probe):
    name = "grad_norm_spike"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        limits = ctx.config.thresholds
        self._window: deque[float] = deque(maxlen=max(2, int(limits.grad_spike_window)))
        self._history: deque[tuple[int, dict[str, float]]] = deque(maxlen=PRE_SPIKE_STEPS)
        self._late: StepBuffer | None = None  # a step whose norm the sentinel had not read yet

    @property
    def _from_sentinel(self) -> bool:
        """The sentinel reads the norm: always under ``check_mode="replay"``, and under
        ``"per_module"`` while the model runs compiled (the sentinel stands in for the check)."""
        mode = self.ctx.check_mode
        return mode == "replay" or (mode == "per_module" and self.ctx.compiled)

    def active(self, plan: StepPlan) -> bool:
        return plan.checking or plan.logging

    def on_after_reduction(self) -> None:
        buffer = self.ctx.buffer
        if buffer is not None and buffer.checking and self._from_sentinel:
            return  # the sentinel reads the norm on this step
        # A DTensor's own shard: a norm of the whole sharded gradient would be a collective that a
        # rank watching alone would wait on forever. Under FSDP the spike is scored on each rank's
        # shard of the gradients (a spike in the whole shows in its parts).
        grads = [local_view(p.grad) for p in self.ctx.params.values() if p.grad is not None]
        if buffer is None or not grads:
            return
        with torch.no_grad():
            total = torch.linalg.vector_norm(torch.stack(foreach_norm([g.detach() for g in grads], torch.float32)))
            scale = self.ctx.grad_scale()
            if scale is not None:
                total = total / scale
        if buffer.checking:  # the last backward of the step wins when it reads the values
            buffer.add_check(_LABEL, total)
        else:
            buffer.add_measure(_MEASURE, total)

    def on_step_end(self, host: HostStep | None) -> None:
        buffer = self.ctx.buffer
        value: float | None = None
        late, self._late = self._late, None
        if late is not None and late.grad_norm is not None and math.isfinite(late.grad_norm):
            # A CUDA sentinel reads without blocking: an earlier step's norm, come since.
            if not late.grads_overflowed:
                self._score(late.step, late.grad_norm)
        if buffer is not None and buffer.checking and self._from_sentinel:
            value = buffer.grad_norm
            if value is None:
                self._late = buffer  # (a step's record, no tensor: nothing held)
        elif buffer is not None and buffer.checking:
            buffer.sync_checks()  # a no-op: the non-finite check moved them already
            found = [v for label, v in zip(buffer.check_labels, buffer.check_values) if label.kind == _LABEL.kind]
            value = found[-1] if found else None
        elif host is not None:
            value = host.measures.get(_MEASURE)
        if host is not None:
            self._history.append((host.step, dict(host.scalars)))
        if value is None or not math.isfinite(value) or buffer is None or buffer.grads_overflowed:
            return
        self._score(buffer.step, value)

    def _score(self, step: int, value: float) -> None:
        limits = self.ctx.config.thresholds
        window = self._window
        # σ only for a value that could be a spike: ≥ ratio x the mean (a few µs per step otherwise).
        if len(window) >= max(2, int(limits.grad_spike_min_history)) and value >= limits.grad_spike_ratio * math.fsum(
            window
        ) / len(window):
            score, mean, sigma = spike_score(value, window)
            recent = int(limits.grad_spike_recent)
            if score >= limits.grad_spike_sigma and 2 <= recent < len(window):
                # (this path only: a value already far above the mean) the recent level too
                score = min(score, spike_score(value, list(window)[-recent:])[0])
            if score >= limits.grad_spike_sigma:
                self.ctx.escalate()  # the next steps log: the per-module views see what spiked
                self._spike(step, value, score, mean, sigma)
        self._window.append(value)

    def _spike(self, step: int, value: float, score: float, mean: float, sigma: float) -> None:
        new = self.ctx.findings.add(
            Alert(
                "grad_norm_spike",
                root_name(self.ctx.root),
                step,
                f"the global gradient norm {value:.3g} is {score:.3g}σ above its rolling mean {mean:.3g}: "
                "a loss spike tends to follow (see diagnostics/pre_spike for the steps before)",
                {"grad_norm": value, "sigma_above": score, "rolling_mean": mean, "rolling_std": sigma},
            )
        )
        if new and self._history:
            self.ctx.writer.call("add_text", PRE_SPIKE_TAG, pre_spike_markdown(list(self._history)), step)


def pre_spike_markdown(history: list[tuple[int, dict[str, float]]]) -> str:
    """The per-module scalars of the last logging steps, one row per tag, one column per step."""
    steps = [step for step, _ in history]
    tags = sorted({t for _, scalars in history for t in scalars})
    lines = ["| tag | " + " | ".join(f"step {s}" for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    for t in tags:
        cells = [f"{scalars[t]:.4g}" if t in scalars else "" for _, scalars in history]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

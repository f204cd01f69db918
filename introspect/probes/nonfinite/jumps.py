"""The sentinel's escalation: one parameter's gradient norm (or the q/k part of a fused q|k|v
projection, or the loss the model returns) jumping against its own history makes the next steps
logging steps (``ctx.escalate()``, within ``Thresholds.escalate_share``). Host numbers the
sentinel's one read per step has anyway; nothing per module on the training thread."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ...debugger.baselines import ParamNormJumps
from ...records.step import StepBuffer
from ..base import ProbeContext

__all__ = ["JumpEscalation", "fused_qk_slices"]


def _conv1d_qk(rows: int, grad: torch.Tensor) -> torch.Tensor:
    """Of a ``[E, 3E]`` gradient (columns q | k | v): a tensor whose norm is its q and k part's."""
    return torch.linalg.vector_norm(grad.view(rows, 3, rows), dim=2, dtype=torch.float32)[:, :2]


def fused_qk_slices(root: nn.Module, names: list[str]) -> list[tuple[str, int, Any]]:
    """The query/key part of each fused q|k|v projection among the parameters ``names`` (in that
    order): ``(name + "[qk]", index in names, f)``, where the norm of ``f(gradient)`` is the
    norm of the gradient's q and k part. A q/k projection scaled x30
    moves its own gradient norm 6-12x; in a fused one the value part, ~40x larger on a fresh
    GPT-2, hides it (the whole ``c_attn`` gradient moves < 1.2x). Known layouts: a ``Conv1D``
    named ``c_attn`` of ``[E, 3E]`` (GPT-2: columns q | k | v) and ``nn.MultiheadAttention``'s
    ``in_proj_weight`` of ``[3E, E]`` (rows q | k | v). Others (GPT-NeoX's per-head interleaving)
    are read whole."""
    index = {n: i for i, n in enumerate(names)}
    found: list[tuple[str, int, Any]] = []
    for module_name, module in root.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if type(module).__name__ == "Conv1D" and module_name.rsplit(".", 1)[-1] == "c_attn":
            weight = getattr(module, "weight", None)
            name = f"{prefix}weight"
            if weight is not None and weight.dim() == 2 and weight.shape[1] == 3 * weight.shape[0] and name in index:
                # Each row's q, k and v norms (a contiguous reduction, ~5 us for [128, 384] on
                # CPU), then the q and k columns of those: the norm of a strided [E, 2E] view of
                # the gradient itself costs ~30 us.
                found.append((f"{name}[qk]", index[name], partial(_conv1d_qk, weight.shape[0])))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            name, width = f"{prefix}in_proj_weight", module.embed_dim
            if name in index:
                found.append((f"{name}[qk]", index[name], lambda g, w=width: g[: 2 * w]))
    return found


class JumpEscalation:
    """Each parameter's gradient norm and the loss against their own histories
    (:class:`~introspect.debugger.baselines.ParamNormJumps`), judged once a step."""

    def __init__(self, ctx: ProbeContext, params: Sequence[tuple[str, torch.Tensor]], sharded: bool) -> None:
        self.ctx = ctx
        self._params = params
        limits = ctx.config.thresholds
        history = int(limits.grad_spike_min_history)
        self.names = tuple(n for n, _ in params)
        # Fused q|k|v projections: their query/key part's norm too, judged by the lasting rule alone.
        sliced = limits.param_grad_jump and limits.param_grad_confirm_sigma and not sharded
        self.slices = fused_qk_slices(ctx.root, list(self.names)) if sliced else []
        self.slice_names = tuple(n for n, _, _ in self.slices)
        self._all_names = self.names + self.slice_names
        self._jumps = (  # 0: off (the escalation's one per-step host cost, ~45 µs)
            ParamNormJumps(
                limits.param_grad_jump,
                limits.param_grad_sigma,
                history,
                confirm_sigmas=limits.param_grad_confirm_sigma,
                confirm_history=int(limits.param_grad_confirm_history),
                confirm_only=frozenset(self.slice_names),
                sizes={n: p.numel() for n, p in params},
            )
            if limits.param_grad_jump
            else None
        )
        self._loss = (
            ParamNormJumps(limits.loss_jump, limits.param_grad_sigma, history, rises_only=True)
            if limits.loss_jump
            else None
        )
        self._judged_step = -1  # the step whose norms joined the history (its first read only)
        self.escalations = 0
        """Granted escalations from these numbers (see ``Thresholds.escalate_share``)."""

    @property
    def per_param(self) -> bool:
        """Whether each parameter's own gradient norm is wanted (else one packed norm will do)."""
        return self._jumps is not None

    @property
    def loss_judged(self) -> bool:
        return self._loss is not None

    def slice_views(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The q/k parts of the fused projections' gradients (``grads`` in the parameters' order)."""
        return [view(grads[i]) for _, i, view in self.slices] if self._jumps is not None else []

    def judge(
        self,
        buffer: StepBuffer,
        param_norms: list[float],
        read_names: tuple[str, ...] | None,
        with_slices: bool,
        out_names: list[str],
        out_values: list[float],
    ) -> None:
        """Once a step (its first read: under gradient accumulation later reads hold sums of more
        micro-batches). ``read_names``: the parameters a deferred read read, else None."""
        if buffer.step == self._judged_step or buffer.grads_overflowed or (self._jumps is None and self._loss is None):
            return
        self._judged_step = buffer.step
        if read_names is not None:
            names = read_names + (self.slice_names if with_slices else ())
        elif len(param_norms) == len(self._all_names):  # every gradient, and the fused q/k parts
            names = self._all_names
        elif len(param_norms) == len(self.names):
            names = self.names
        else:  # some parameters got no gradient this step: their own histories stay aside
            names = tuple(n for n, p in self._params if p.grad is not None)
        jumped = self._jumps.update(names, param_norms) if self._jumps is not None and param_norms else None
        loss = [v for n, v in zip(out_names, out_values) if n == "loss"] if self._loss is not None else []
        if loss and self._loss is not None and self._loss.update(("loss",), loss[:1]) is not None:
            jumped = jumped or ("loss", 0.0)
        if jumped is not None and self.ctx.escalate():  # (within the escalations' time budget)
            self.escalations += 1

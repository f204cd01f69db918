"""Mixture-of-experts: per-expert load, router entropy and router max logit of each MoE block, on
logging steps only (hooks for that step alone: nothing off the cadence), and the findings
``expert_collapse`` and ``router_logit_growth``, each measured against the run's own start.

An MoE block is a module with a set of experts and a router:

* experts: a child ``nn.ModuleList`` of two or more modules of one type that own parameters
  (transformers 4's Mixtral, most hand-written MoEs), or a child whose own parameters are all
  3-D or more with one leading size E >= 2 (transformers 5 stores Mixtral's and Qwen-MoE's experts
  as fused ``gate_up_proj``/``down_proj`` of shape (E, ...));
* router: another child with a 2-D ``weight`` of E rows (``nn.Linear(d, E)``, transformers'
  ``TopKRouter``), preferably named ``gate``/``router``.

The router's output gives the logits (the floating tensor whose last size is E) and, when it
returns them (transformers 5), the chosen experts (an integer tensor). Otherwise the load is
counted from the rows each expert of a ``ModuleList`` receives (exact, dropped tokens included),
or from the top-k of the logits (``top_k``/``num_experts_per_tok`` of the block, else 1). Under
``torch.compile`` the probe is off: its hooks cannot enter the compiled graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..debugger.alerts import Alert
from ..records.step import HostStep
from ..records.tags import moe_tag
from ..runtime.selection import root_name
from .base import Probe, ProbeContext, StepPlan

__all__ = ["MixtureOfExperts", "MoeBlock", "moe_blocks", "fused_expert_count", "BASELINE_STEPS"]

BASELINE_STEPS = 3
"""Logging steps whose mean is "the run's start" for the findings (one step is noisy)."""
_ROUTER_NAMES = ("gate", "router", "gating", "w_gate", "switch", "wg")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k")


@dataclass
class MoeBlock:
    """One MoE block: its router, how many experts it routes to, and (when they are separate
    modules) the experts themselves, whose input rows give the load."""

    router: nn.Module
    experts: int
    expert_modules: list[nn.Module]
    top_k: int
    rows: list[int] = field(default_factory=list)  # this step's rows per expert (ModuleList experts)
    start: dict[str, list[float]] = field(default_factory=dict)  # the first logging steps' values


def fused_expert_count(module: nn.Module) -> int:
    """E when every parameter of ``module`` itself is (E, ...) with 3 or more dimensions (fused
    experts, one slice per expert), else 0."""
    leading = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() >= 3}
    own = list(module.parameters(recurse=False))
    if len(leading) != 1 or not own or any(p.dim() < 3 for p in own):
        return 0
    (count,) = leading
    return count if count >= 2 else 0


def _experts_of(module: nn.Module) -> tuple[str, int, list[nn.Module]] | None:
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            members = list(child)
            if len({type(m) for m in members}) == 1 and any(True for _ in members[0].parameters()):
                return name, len(members), members
        count = fused_expert_count(child)
        if count:
            return name, count, []
    return None


def _router_of(module: nn.Module, experts_name: str, count: int) -> nn.Module | None:
    found = []
    for name, child in module.named_children():
        weight = getattr(child, "weight", None)
        if name != experts_name and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if weight.shape[0] == count:
                found.append((name not in _ROUTER_NAMES, name, child))
    return min(found, key=lambda f: f[:2])[2] if found else None


def moe_blocks(root: nn.Module) -> dict[str, MoeBlock]:
    """Every MoE block of ``root`` by its dotted name (see the module docstring)."""
    top = root_name(root)
    blocks: dict[str, MoeBlock] = {}
    for name, module in root.named_modules():
        experts = _experts_of(module)
        if experts is None:
            continue
        experts_name, count, members = experts
        router = _router_of(module, experts_name, count)
        if router is None:
            continue
        top_k = next(
            (getattr(m, a) for m in (module, router) for a in _TOP_K_NAMES if isinstance(getattr(m, a, None), int)), 1
        )
        blocks[name or top] = MoeBlock(router, count, members, max(1, min(int(top_k), count)))
    return blocks


def _routing(output: Any, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, chosen experts) in a router's output: the floating tensor whose last size is the
    number of experts, and an integer tensor of expert indices when the router returns one."""
    parts = list(output) if isinstance(output, (tuple, list)) else [output]
    logits = next(
        (t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1:] == (count,)), None
    )
    chosen = next(
        (
            t
            for t in parts
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool and t.dim() >= 1
        ),
        None,
    )
    return logits, chosen


class MixtureOfExperts(Probe):
    """``moe/load/{block}`` (histogram, one value per expert), ``moe/router_entropy/{block}``,
    ``moe/router_max_logit/{block}``; findings ``expert_collapse`` and ``router_logit_growth``."""

    name = "moe"
    builtin = True

    def bind(self, ctx: ProbeContext) -> None:
        super().bind(ctx)
        self._blocks = moe_blocks(ctx.root)

    def active(self, plan: StepPlan) -> bool:
        return plan.logging and bool(self._blocks) and not self.ctx.compiled

    def on_step_start(self, plan: StepPlan) -> None:
        hooks = self.ctx.step_hooks
        for name, block in self._blocks.items():
            block.rows = [0] * len(block.expert_modules)
            hooks.hook(block.router.register_forward_hook(lambda m, a, o, n=name: self._route(n, o)))
            for i, expert in enumerate(block.expert_modules):
                hooks.hook(expert.register_forward_pre_hook(lambda m, a, b=block, i=i: self._rows(b, i, a)))

    def _rows(self, block: MoeBlock, index: int, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            block.rows[index] += x.numel() // max(1, x.shape[-1])  # a shape: no device work

    def _route(self, name: str, output: Any) -> None:
        buffer, block = self.ctx.buffer, self._blocks[name]
        if buffer is None or "<moe>" in self.ctx.disabled:
            return
        try:
            logits, chosen = _routing(output, block.experts)
            if logits is None:
                return
            with torch.no_grad():
                flat = logits.detach().float().reshape(-1, block.experts)
                p = torch.softmax(flat, dim=-1)
                buffer.add_scalar(moe_tag("router_entropy", name), torch.special.entr(p).sum(-1).mean())
                buffer.add_scalar(moe_tag("router_max_logit", name), flat.amax())
                if block.expert_modules:
                    return  # the load comes from the rows the experts receive (on_forward_end)
                if chosen is None:
                    chosen = flat.topk(block.top_k, dim=-1).indices
                counts = torch.bincount(chosen.detach().reshape(-1).long(), minlength=block.experts)
                self._load(name, counts[: block.experts].float())
        except Exception as e:  # routing ran already: training goes on
            self.ctx.disable("<moe>", None, e)

    def _load(self, name: str, counts: torch.Tensor) -> None:
        buffer = self.ctx.buffer
        if buffer is None:
            return
        load = counts / counts.sum().clamp_min(1)
        buffer.set_histogram(moe_tag("load", name), load)
        buffer.add_measure(f"moe_effective/{name}", torch.special.entr(load).sum().exp())
        buffer.add_measure(f"moe_max_load/{name}", load.amax())

    def on_forward_end(self, output: Any) -> None:
        for name, block in self._blocks.items():
            if block.expert_modules and any(block.rows):
                self._load(name, torch.tensor(block.rows, dtype=torch.float32))
                block.rows = [0] * len(block.expert_modules)

    def on_step_end(self, host: HostStep | None) -> None:
        if host is None:
            return
        limits = self.ctx.config.thresholds
        for name, block in self._blocks.items():
            effective = host.measures.get(f"moe_effective/{name}")
            top = host.scalars.get(moe_tag("router_max_logit", name))
            start_effective = self._start(block, "effective", effective)
            start_top = self._start(block, "max_logit", top)
            module_type = self.ctx.module_types.get(name, type(block.router).__name__)
            if (
                effective is not None
                and start_effective is not None
                and effective < limits.moe_collapse_ratio * start_effective
            ):
                share = host.measures.get(f"moe_max_load/{name}", math.nan)
                self.ctx.findings.add(
                    Alert(
                        "expert_collapse",
                        name,
                        host.step,
                        f"the routed tokens spread over {effective:.3g} effective experts of {block.experts} (the run "
                        f"started at {start_effective:.3g}); one expert takes {share:.0%}: the others stop learning. "
                        "A load-balancing loss (router_aux_loss_coef) or router noise is the usual fix",
                        {"effective_experts": effective, "start_effective_experts": start_effective, "max_load": share},
                        module_type=module_type,
                    )
                )
            if (
                top is not None
                and start_top is not None
                and math.isfinite(top)
                and top > limits.moe_router_max_logit
                and top > limits.moe_router_logit_growth * max(start_top, 1e-12)
            ):
                self.ctx.findings.add(
                    Alert(
                        "router_logit_growth",
                        name,
                        host.step,
                        f"router logits reach {top:.3g}, {top / max(start_top, 1e-12):.3g}x the run's start "
                        f"({start_top:.3g}): the routing softmax saturates; a router z-loss (ST-MoE) keeps them small",
                        {"max_logit": top, "start_max_logit": start_top},
                        module_type=module_type,
                    )
                )

    @staticmethod
    def _start(block: MoeBlock, key: str, value: float | None) -> float | None:
        """The mean of the first ``BASELINE_STEPS`` logging steps' values; None until they are in."""
        seen = block.start.setdefault(key, [])
        if len(seen) < BASELINE_STEPS:
            if value is not None and math.isfinite(value):
                seen.append(value)
            return None
        return sum(seen) / len(seen)

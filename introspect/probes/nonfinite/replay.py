"""Replay a training step, exactly, to name where its NaN/Inf came from.

The non-finite sentinel (:mod:`introspect.probes.nonfinite.sentinel`) checks a step's outputs and gradients
with a few fused reductions; only when one is not finite does it replay the step with the
per-module check on, which costs a forward and a backward then and nothing on the other steps.
What makes the replay the same step:

* the same inputs, held by reference since the forward; their in-place version counters
  (``_version``) say whether they are still what the forward read;
* the RNG state saved at the forward's start (CPU and the model's CUDA devices), so dropout
  draws the same masks; :func:`torch.random.fork_rng` puts the RNG back afterwards, so training
  after the replay draws exactly what it would have drawn without it;
* the autocast state the forward ran under;
* the parameters, buffers (BatchNorm's running statistics) and tensor attributes copied before and
  restored after (a momentum teacher updated in ``forward``, a queue): the replay's
  own updates are undone. A training-mode forward that *reads* a buffer it also updated during
  the forward sees the updated value (BatchNorm in training mode reads batch statistics only);
* the gradient that arrived at each model output, captured by the sentinel, pushed back through
  :func:`torch.autograd.grad`, so ``.grad`` is never touched (nor DDP's reducer, whose hooks run
  on gradient accumulation only);
* under ``torch.compile``, the eager model (``torch.compiler.set_stance("force_eager")``): the
  compiled graph has no per-module hooks, the eager replay does, so a compiled model gets a
  per-layer origin too.

The replay's forward runs the user's code again: a module with Python side effects in
``forward`` (a counter, a cache) sees one more call, as with the first batch's summary and graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..._torch import tensor_version
from ...debugger.alerts import Alert
from ...debugger.origins import locate_nonfinite
from ...records import step as step_records
from ...records.step import StepBuffer
from ...runtime.preserved import preserved_state
from ...runtime.tensors import named_float_tensors, named_tensors
from ..base import ProbeContext
from ..moe import fused_expert_count
from .per_module import CallLedger

__all__ = ["ForwardRecord", "ReplayOutcome", "capture_forward", "replay_step", "run_forward", "eager_stance"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class ForwardRecord:
    """What one training forward needs to run again: its inputs and the state it started in."""

    args: tuple
    kwargs: dict
    versions: list[tuple[torch.Tensor, int]]
    cpu_rng: torch.Tensor
    cuda_rng: dict[int, torch.Tensor]
    autocast: list[tuple[str, torch.dtype]]
    """``(device type, dtype)`` of each autocast context the forward ran inside."""
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Index into the output's floating tensors -> the gradient that arrived there in backward."""

    def changed_inputs(self) -> list[str]:
        """Names of the inputs changed in place since the forward read them."""
        names = [n for n, _ in named_tensors((self.args, self.kwargs))]
        return [
            names[i] if i < len(names) else str(i) for i, (t, v) in enumerate(self.versions) if tensor_version(t) != v
        ]


@dataclass
class ReplayOutcome:
    """``alert``: the origin the replay found, its numbers holding the counts and finite ranges of
    the bad values (None when it found none). ``reason``: why it could not reproduce the
    sentinel's finding, when it did not. ``half_outputs``: the float16/bfloat16 outputs it saw."""

    alert: Alert | None
    reason: str | None = None
    half_outputs: dict[str, torch.dtype] = field(default_factory=dict)
    own_gradients_finite: bool = False
    """The replay's own parameter gradients (this step's alone) were computed, all finite."""
    nonfinite_counts: dict[str, float] = field(default_factory=dict)
    """NaN/Inf values per watched output (its output and the gradient w.r.t. it, summed, as the
    ``nonfinite/{module}`` scalars hold them), where not zero: the health map's column for this
    step, which is usually not a logging step (only the replay saw every layer's values)."""


def capture_forward(args: tuple, kwargs: dict, devices: list[int]) -> ForwardRecord:
    """The state at a training forward's start (a 5 KB copy of the CPU generator, 16 bytes per
    CUDA device, the inputs' version counters): all host work, no device op."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
        versions = [(args[0], tensor_version(args[0]))]
    else:
        versions = [(t, tensor_version(t)) for _, t in named_tensors((args, kwargs))]
    return ForwardRecord(
        args=args,
        kwargs=kwargs,
        versions=versions,
        cpu_rng=torch.get_rng_state(),
        cuda_rng={d: torch.cuda.get_rng_state(d) for d in devices},
        autocast=_autocast_state(),
    )


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The autocast contexts in force, as ``(device type, dtype)``; the device-type arguments are
    public since torch 2.4, the per-device functions before that."""
    if hasattr(torch, "get_autocast_dtype"):
        return [(d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
    state = []
    if torch.is_autocast_cpu_enabled():
        state.append(("cpu", torch.get_autocast_cpu_dtype()))
    if torch.is_autocast_enabled():
        state.append(("cuda", torch.get_autocast_gpu_dtype()))
    return state


def replay_step(ctx: ProbeContext, records: list[ForwardRecord], ledger: CallLedger, step: int) -> ReplayOutcome:
    """Run ``records``' forwards again with ``ledger`` (a :class:`~introspect.probes.nonfinite.per_module.CallLedger`)
    on every watched module, then their backward from the captured output gradients; the origin
    of the first NaN/Inf, with its numbers, or why there is none."""
    changed = [name or "input" for r in records for name in r.changed_inputs()]
    if changed:
        return ReplayOutcome(None, f"the forward's inputs were changed in place after it ({', '.join(changed[:3])})")
    buffer = StepBuffer(step=step, logging=False, checking=True)
    numbers = ValueStats()
    param_grads: list[tuple[str, torch.Tensor]] = []
    try:
        # preserved_state: the buffers copied and put back, the RNG forked (and modes kept).
        with (
            _replay_hooks(ctx, ledger, buffer, numbers),
            preserved_state(ctx.root),
            ctx.unobserved(),
            torch.enable_grad(),
            eager_stance(ctx.compiled),
        ):
            roots: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            for record in records:
                output = _forward(ctx.root, record, ledger, buffer)
                tensors = named_float_tensors(output)
                for index, grad in record.grads.items():
                    if index < len(tensors) and tensors[index][1].requires_grad:
                        roots.append(tensors[index][1])
                        grads.append(grad)
            roots, grads = _outermost(roots, grads)
            named = [(n, p) for n, p in ctx.root.named_parameters() if p.requires_grad]
            if roots and named:
                found = torch.autograd.grad(roots, [p for _, p in named], grads, allow_unused=True)
                param_grads = [(n, g) for (n, _), g in zip(named, found) if g is not None]
    except Exception as e:  # the replay must never cost the user the step
        return ReplayOutcome(None, f"the replay failed: {type(e).__name__}: {e}")
    buffer.sync_checks()
    alert = locate_nonfinite(step, buffer.calls, buffer.check_labels, buffer.check_values)
    if alert is not None and alert.phase == "backward" and param_grads:
        # Which parameters' gradients went bad tells apart the readers of one input (q/k/v): one
        # flag per parameter, one transfer, on this (NaN) path only.
        flags = torch.stack([torch.isfinite(g).all() for _, g in param_grads]).tolist()
        bad = [n for (n, _), ok in zip(param_grads, flags) if not ok]
        if bad:
            alert = locate_nonfinite(step, buffer.calls, buffer.check_labels, buffer.check_values, bad)
    if alert is None:
        alert = _parameter_gradient_origin(step, param_grads, ctx)
    if alert is None:
        return ReplayOutcome(
            None,
            "every value of the replayed step was finite (a non-deterministic kernel, or state the forward changed?)",
            own_gradients_finite=bool(param_grads),
        )
    alert.numbers.update(numbers.of(alert, buffer))
    alert = numbers.with_expert(alert)
    return ReplayOutcome(alert, half_outputs=dict(ledger.half_outputs), nonfinite_counts=numbers.counts())


def _forward(root: nn.Module, record: ForwardRecord, ledger: CallLedger, buffer: StepBuffer) -> Any:
    ledger.model_inputs(buffer, record.args, record.kwargs)
    output = run_forward(root, record)
    ledger.model_outputs(buffer, output)
    return output


def run_forward(root: nn.Module, record: ForwardRecord) -> Any:
    """``root``'s forward again on ``record``'s inputs, from the RNG and autocast state it started
    in (the caller forks the RNG: :func:`~introspect.runtime.preserved.preserved_state`)."""
    torch.set_rng_state(record.cpu_rng)
    for device, state in record.cuda_rng.items():
        torch.cuda.set_rng_state(state, device)
    with contextlib.ExitStack() as stack:
        for device_type, dtype in record.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        return root(*record.args, **record.kwargs)


@contextlib.contextmanager
def _replay_hooks(ctx: ProbeContext, ledger: CallLedger, buffer: StepBuffer, numbers: ValueStats) -> Iterator[None]:
    """The per-module check on every watched module, for the replay only."""
    handles = []

    def output_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs = ctx.outputs(name, output)
            try:
                call = ledger.output(buffer, name, args, outputs)
                if name in fused:
                    numbers.add_routed(name, fused[name], args, outputs)
                for where, _, tensor in outputs:
                    numbers.add("out", where, tensor)
                    if tensor.requires_grad:
                        tensor.register_hook(grad_hook(call, where))
            finally:
                ctx.forget_output()

        return hook

    def grad_hook(call: int, where: str) -> Any:
        def hook(grad: torch.Tensor | None) -> None:
            if grad is None:  # one of a node's several outputs, unused: nothing arrived
                return
            ledger.output_grad(buffer, call, where, grad)
            numbers.add("grad", where, grad)

        return hook

    fused = {name: count for name, module in ctx.modules.items() if (count := fused_expert_count(module))}
    try:
        for name, module in ctx.modules.items():
            if name not in ctx.disabled:
                handles.append(module.register_forward_hook(output_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def eager_stance(compiled: bool) -> contextlib.AbstractContextManager:
    """Compiled code run eagerly (its graph has no per-module hooks); public since torch 2.6."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if not compiled or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _outermost(roots: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list, list]:
    """The outputs whose gradient is not already part of another's: an HF model returns ``loss``
    and the ``logits`` it was computed from, and the gradient a hook saw at ``logits`` holds the
    loss's share, so pushing both back would count that share twice."""
    if len(roots) < 2:
        return roots, grads
    reach = [_graph_nodes(r) for r in roots]
    keep = [
        i
        for i, r in enumerate(roots)
        if not any(j != i and r.grad_fn in reach[j] and r.grad_fn is not roots[j].grad_fn for j in range(len(roots)))
    ]
    return [roots[i] for i in keep], [grads[i] for i in keep]


def _graph_nodes(tensor: torch.Tensor) -> set:
    seen: set = set()
    stack = [tensor.grad_fn] if tensor.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return seen


def _parameter_gradient_origin(step: int, grads: list[tuple[str, torch.Tensor]], ctx: ProbeContext) -> Alert | None:
    """A NaN/Inf born in a parameter's own gradient while every activation gradient stayed finite
    (a weight used through ``sqrt``, ``log`` or a division in ``forward``)."""
    for name, grad in grads:
        finite = torch.isfinite(grad)
        if bool(finite.all()):
            continue
        what = "NaN" if bool(torch.isnan(grad).any()) else "Inf"
        module = name.rpartition(".")[0]
        module_type = ctx.module_types.get(module, "")
        return Alert(
            "nonfinite",
            module or name,
            step,
            f"{what} gradient first appears in the gradient of the parameter {name} while every "
            "activation gradient was finite: its own use in the forward (sqrt, log or a division "
            "of the weight?) made it",
            {"nonfinite_values": float((~finite).sum()), "values": float(grad.numel())},
            phase="backward",
            module_type=module_type,
        )
    return None


class ValueStats:
    """Counts and finite ranges of every tensor the replay's check sees, kept on the device (a
    few reductions each, on this rare path) and read for the origin only."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
        self._routed: dict[str, list[int]] = {}

    def add_routed(self, name: str, experts: int, args: Any, outputs: list[tuple[str, str, torch.Tensor]]) -> None:
        """A fused-experts call (one (E, ...) parameter for all experts, ``experts`` of them): the
        experts that every non-finite row of its output was routed to, from its integer argument
        (the chosen experts of each token, as transformers passes ``top_k_index``); the first
        non-finite call of the module wins."""
        chosen = next((t for _, t in named_tensors(args) if not t.is_floating_point() and t.dtype != torch.bool), None)
        if name in self._routed or chosen is None or len(outputs) != 1 or chosen.dim() < 1:
            return
        out = outputs[0][2].detach()
        rows = chosen.shape[0]
        if out.dim() < 1 or out.numel() % rows or out.shape[0] != rows:
            return
        bad = (~torch.isfinite(out)).reshape(rows, -1).any(1)
        if not bool(bad.any()):
            return
        picks = chosen[bad].reshape(int(bad.sum()), -1).long().clamp(0, experts)  # (an "experts" index: no expert)
        hits = torch.zeros(picks.shape[0], experts + 1, dtype=torch.bool, device=picks.device)
        hits.scatter_(1, picks, True)
        self._routed[name] = hits[:, :experts].all(0).nonzero().flatten().tolist()

    def with_expert(self, alert: Alert) -> Alert:
        """A forward origin at a fused-experts module, with the one expert its bad rows share."""
        experts = self._routed.get(alert.where)
        if alert.phase != "forward" or not experts:
            return alert
        if len(experts) == 1:
            alert.numbers["expert"] = float(experts[0])
        named = ", ".join(str(e) for e in experts[:4])
        return dataclasses.replace(
            alert, message=f"{alert.message}; its non-finite rows are the tokens routed to experts[{named}]"
        )

    def add(self, kind: str, where: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if t.numel() == 0:
            return
        finite = torch.isfinite(t)
        big = torch.finfo(torch.float32).max
        self._stats[(kind, where)] = (
            torch.stack(
                [
                    (~finite).sum().float(),
                    torch.where(finite, t, big).amin().float(),
                    torch.where(finite, t, -big).amax().float(),
                ]
            ),
            t.numel(),
        )

    def counts(self) -> dict[str, float]:
        """``{where: NaN/Inf values in its output and the gradient w.r.t. it}``, where not zero, in
        the order the outputs were seen; one transfer for them all."""
        if not self._stats:
            return {}
        keys = list(self._stats)
        bad = step_records.one_transfer([self._stats[k][0][0] for k in keys])
        counts: dict[str, float] = {}
        for (_, where), value in zip(keys, bad):
            if value > 0:
                counts[where] = counts.get(where, 0.0) + value
        return counts

    def _read(self, kind: str, where: str) -> list[float] | None:
        """``[non-finite count, numel, finite min, finite max]``, or None when not seen."""
        found = self._stats.get((kind, where))
        if found is None:
            return None
        bad, low, high = found[0].cpu().tolist()
        return [bad, float(found[1]), low, high]

    def of(self, alert: Alert, buffer: StepBuffer) -> dict[str, float]:
        """``nonfinite_values``, ``values``, ``finite_min``/``finite_max`` of the bad tensor (the
        origin's output in forward; in backward the gradient the culprit passed back), and
        ``upstream_min``/``upstream_max`` of what it read when that was finite."""
        if alert.where == "input":
            return {}
        if alert.phase == "forward":
            bad = ("out", alert.where)
            call = next((c for c in buffer.calls if c.module == alert.where.split("/")[0]), None)
            upstream = [("out", buffer.calls[p].module) for p in (call.producers if call else [])[:1]]
        else:
            first_bad = next(
                (
                    label
                    for label, v in zip(buffer.check_labels, buffer.check_values)
                    if label.kind == "grad" and not math.isfinite(v)
                ),
                None,
            )
            bad = ("grad", first_bad.where if first_bad else alert.where)
            upstream = [("grad", alert.where)]
        numbers: dict[str, float] = {}
        values = self._read(*bad)
        if values is not None and values[0] > 0:
            numbers.update(nonfinite_values=values[0], values=values[1])
            if values[0] < values[1]:
                numbers.update(finite_min=values[2], finite_max=values[3])
        source = self._read(*upstream[0]) if upstream else None
        if source is not None and source[0] == 0:
            numbers.update(upstream_min=source[2], upstream_max=source[3])
        return numbers

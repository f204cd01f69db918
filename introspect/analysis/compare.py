"""Where two models first part ways on the same batch: module by module, in execution order.

>>> d = first_divergence(model_a, model_b, x, backward=True)      # doctest: +SKIP
>>> print(d.table())                                               # doctest: +SKIP
>>> d.first.module                                                 # doctest: +SKIP
'layer3.0.conv1'

"My model stopped training after a refactor", "compile gives different losses", "bf16 diverges
from fp32": each asks which layer first computes something else. Both models run the same inputs
from the same RNG state (dropout draws the same masks), with a forward hook on every module; each
module output (and with ``backward=True`` each gradient w.r.t. a module output) of B is compared
with A's: bitwise equality, the largest absolute difference, the largest difference relative to
A's own scale (``max|a - b| / max|a|``: element-wise ratios explode where A is near zero), and
the cosine of the two as vectors for tensors of ``COSINE_MIN`` values or more. A module diverges
when ``max|a - b| > atol + rtol · max|a|`` (or when NaN/Inf appear in one and not the other, or
shapes differ); the first such module in execution order (the order modules finish their
forward, so a layer comes before the block that holds it) is the answer. Everything before it
reports whether it was exactly equal, so a planted change shows as "exact, exact, ..., diverged".

Modules are matched by name (``named_modules()``), so two classes with the same layer names (a
refactor) compare; names that do not correspond are an error that lists them. Each model's
buffers, gradients, modes and the caller's RNG are put back afterwards. Memory: every module
output of both forwards is kept (copied: a later in-place op must not change what was seen)
until the comparison is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelTypeError
from ..load.model_inputs import input_error
from ..runtime.compiled import forget_compiled_code, is_compiled
from ..runtime.preserved import preserved_state
from ..runtime.selection import root_name, unwrap_model
from ..runtime.tensors import backward_target, named_float_tensors
from ..terminal import escape, format_table

__all__ = ["ModuleDiff", "Divergence", "first_divergence", "AUTOCAST_DTYPES", "COSINE_MIN"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
"""Names ``autocast=`` accepts besides a torch dtype."""

COSINE_MIN = 16
"""Tensors of at least this many values also get the cosine of A and B (for a handful of values
the largest difference already says it all)."""

DEFAULT_RTOL = 1e-4
"""Above float32 round-off of a reordered sum (~1e-6 relative), below bfloat16's (~4e-3)."""


@dataclass(frozen=True)
class ModuleDiff:
    """One module output (or the gradient w.r.t. it) in A and in B."""

    index: int
    """Position in execution order (forward: the order modules finished; backward: the order
    the gradients arrived)."""
    module: str
    """The module's name (the root is ``model``), with ``/{index or key}`` for one of several
    output tensors and ``#k`` for its k-th call after the first."""
    module_type: str
    phase: str
    """``"forward"`` (the output) or ``"backward"`` (the gradient w.r.t. the output)."""
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    exact: bool
    """Bitwise the same values (NaN where NaN), whatever the dtypes."""
    max_abs: float
    max_rel: float
    """``max|a - b| / max|a|`` over the finite values."""
    cosine: float
    """Cosine of A and B as vectors; NaN under ``COSINE_MIN`` values or for a zero vector."""
    diverged: bool
    note: str = ""


@dataclass
class Divergence:
    """The result of :func:`first_divergence`: every compared output, and the first that diverged."""

    forward: list[ModuleDiff]
    backward: list[ModuleDiff]
    rtol: float
    atol: float
    only_in_a: list[str] = field(default_factory=list)
    """Outputs A produced and B did not (a module B skipped, or called fewer times)."""
    only_in_b: list[str] = field(default_factory=list)

    @property
    def first(self) -> ModuleDiff | None:
        """The first module whose output diverged, in execution order (None: none did)."""
        return next((d for d in self.forward if d.diverged), None)

    @property
    def first_backward(self) -> ModuleDiff | None:
        """The first gradient that diverged, in the order backward produced them."""
        return next((d for d in self.backward if d.diverged), None)

    def findings(self) -> list[str]:
        """What ``--fail-on`` counts: each phase whose first divergence was found, and outputs
        that ran in one model only."""
        found = [f"{d.phase} divergence at {d.module}" for d in (self.first, self.first_backward) if d is not None]
        if self.only_in_a or self.only_in_b:
            found.append(f"{len(self.only_in_a) + len(self.only_in_b)} outputs in one model only")
        return found

    def summary(self) -> str:
        """One or two lines naming the first divergence and what came before it."""
        lines = []
        for phase, diffs, first in (
            ("forward", self.forward, self.first),
            ("backward", self.backward, self.first_backward),
        ):
            if not diffs:
                continue
            what = "output" if phase == "forward" else "gradient"
            if first is None:
                exact = sum(d.exact for d in diffs)
                lines.append(
                    f"{phase}: no {what} diverges beyond rtol={self.rtol:g}, atol={self.atol:g} "
                    f"({len(diffs)} compared, {exact} exactly equal)"
                )
                continue
            before = diffs[: first.index]
            exact = sum(d.exact for d in before)
            lines.append(
                f"{phase}: first divergence at {escape(first.module)} ({escape(first.module_type)}), {what} {first.index + 1} of "
                f"{len(diffs)}: max |a-b| {first.max_abs:.3g}, {first.max_rel:.3g} of max|a|"
                + (f" ({first.note})" if first.note else "")
                + f"; {exact} of the {len(before)} before it exactly equal"
            )
        if self.only_in_a or self.only_in_b:
            lines.append(
                f"ran in one model only: {len(self.only_in_a)} outputs in A (e.g. {', '.join(map(escape, self.only_in_a[:3])) or '-'}), "
                f"{len(self.only_in_b)} in B (e.g. {', '.join(map(escape, self.only_in_b[:3])) or '-'})"
            )
        return "\n".join(lines)

    def table(self) -> str:
        """Every compared output, one row each, with the first divergence marked."""
        first = {id(self.first), id(self.first_backward)}
        rows = [
            [
                str(d.index),
                d.phase,
                d.module,
                d.module_type,
                str(list(d.shape_a)),
                "yes" if d.exact else "no",
                d.max_abs,
                d.max_rel,
                "—" if math.isnan(d.cosine) else f"{d.cosine:.6f}",
                ("<- FIRST DIVERGENCE" if id(d) in first else "diverged" if d.diverged else "")
                + (f" ({d.note})" if d.note else ""),
            ]
            for d in self.forward + self.backward
        ]
        return format_table(
            ["#", "phase", "module", "type", "shape", "exact", "max |a-b|", "max rel", "cosine", ""],
            rows,
            right=[True, False, False, False, False, False, True, True, True, False],
        )

    def image(self) -> np.ndarray:
        """The per-module relative difference as a figure (HWC uint8); see ``visuals.divergence_image``."""
        from ..records.visuals import divergence_image

        return divergence_image(self.forward, self.backward, self.rtol)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def first_divergence(
    model_a: nn.Module,
    model_b: nn.Module,
    *inputs: Any,
    backward: bool = False,
    autocast: torch.dtype | str | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    seed: int = 0,
) -> Divergence:
    """Run both models on ``inputs`` and compare every module output (and gradient), in order.

    >>> b = copy.deepcopy(a); b.fc2.weight.data += 1e-3                 # doctest: +SKIP
    >>> first_divergence(a, b, x).first.module                          # doctest: +SKIP
    'fc2'

    Args:
        model_a, model_b: the two models; the same object twice is fine (e.g. with ``autocast``),
            and so is a ``torch.compile``'d model (its layers are hooked inside the compiled graph).
        inputs: the positional inputs, given to both (B gets its own copy).
        backward: also backpropagate the sum of each model's output (its first floating tensor)
            and compare the gradients w.r.t. every module output.
        autocast: run B under ``torch.autocast`` with this dtype (``torch.bfloat16``, ``"bf16"``,
            ``"fp16"``) on the inputs' device; A runs as it is.
        rtol, atol: a module diverges when ``max|a - b| > atol + rtol * max|a|``.
        seed: both forwards start from ``torch.manual_seed(seed)`` (the caller's RNG state is
            restored afterwards).

    Raises:
        ModelTypeError: a model is not an ``nn.Module`` or is TorchScript (hooks cannot see its layers).
        ConfigError: the models' module names do not correspond, or a bad ``autocast``/tolerance.
        InputShapeError: a model rejects the inputs.
    """
    for label, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module):
            raise ModelTypeError(f"{label} must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise ModelTypeError(
                f"{label} is TorchScript: its layers run in C++, where Python hooks cannot see them; "
                "load its weights into the Python architecture (--arch) or use a torch.export .pt2"
            )
    if not (rtol >= 0 and atol >= 0):
        raise ConfigError(f"rtol and atol must be >= 0, got rtol={rtol!r}, atol={atol!r}")
    cast = _autocast_dtype(autocast)
    _check_names(unwrap_model(model_a), unwrap_model(model_b))
    run_a = _run(model_a, inputs, backward, None, seed)
    run_b = _run(model_b, inputs, backward, cast, seed)
    forward, only_a, only_b = _compare(run_a, run_b, "forward", rtol, atol)
    grads, grads_only_a, grads_only_b = _compare(run_a, run_b, "backward", rtol, atol)
    return Divergence(forward, grads, rtol, atol, only_a + grads_only_a, only_b + grads_only_b)


# --------------------------------------------------------------------------- running
@dataclass
class _Run:
    types: dict[str, str]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """key -> copy of the output, in execution order."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """key -> copy of the gradient w.r.t. that output, in the order backward produced them."""


def _autocast_dtype(autocast: torch.dtype | str | None) -> torch.dtype | None:
    if autocast is None or isinstance(autocast, torch.dtype):
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"autocast= takes torch.bfloat16 or torch.float16, got {autocast}")
        return autocast
    dtype = AUTOCAST_DTYPES.get(str(autocast).lower())
    if dtype is None:
        raise ConfigError(f"autocast= takes one of {sorted(AUTOCAST_DTYPES)} or a torch dtype, got {autocast!r}")
    return dtype


def _check_names(a: nn.Module, b: nn.Module) -> None:
    """Modules are matched by name: the two name lists must be the same set."""
    names_a = [n for n, _ in a.named_modules()]
    names_b = [n for n, _ in b.named_modules()]
    set_b = set(names_b)
    set_a = set(names_a)
    missing = [n for n in names_a if n not in set_b]
    extra = [n for n in names_b if n not in set_a]
    if missing or extra:

        def shown(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"

        raise ConfigError(
            f"the models' module names do not correspond ({type(a).__name__} has {len(names_a)} modules, "
            f"{type(b).__name__} has {len(names_b)}): only in A: {shown(missing)}; only in B: {shown(extra)}. "
            "first_divergence matches modules by their names in named_modules()"
        )


def _run(model: nn.Module, inputs: Sequence[Any], backward: bool, cast: torch.dtype | None, seed: int) -> _Run:
    root = unwrap_model(model)
    top = root_name(root)
    names = {m: (n or top) for n, m in root.named_modules()}
    run = _Run(types={n: type(m).__name__ for m, n in names.items()})
    calls: dict[str, int] = {}

    def output_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            call = calls.get(name, 0)
            calls[name] = call + 1
            tensors = named_float_tensors(output)
            for suffix, tensor in tensors:
                key = name + (f"/{suffix}" if suffix and len(tensors) > 1 else "") + (f"#{call}" if call else "")
                run.outputs[key] = tensor.detach().clone()
                if backward and tensor.requires_grad:
                    tensor.register_hook(grad_hook(key))

        return hook

    def grad_hook(key: str) -> Any:
        def hook(grad: torch.Tensor | None) -> None:
            if grad is not None:  # None: one of a node's several outputs, unused
                run.grads[key] = grad.detach().clone()

        return hook

    args = tuple(_fresh(x, backward) for x in inputs)
    device = next((x.device for x in args if isinstance(x, torch.Tensor)), None) or _device_of(root)
    saved_grads = {p: p.grad for p in root.parameters()}
    compiled = is_compiled(model, root)
    handles = []
    try:
        # Dynamo does not guard on module hooks: code compiled before would never call these
        # (see compiled.py), so a compiled model retraces with them, and again after they go.
        if compiled:
            forget_compiled_code()
        for module, name in names.items():
            handles.append(module.register_forward_hook(output_hook(name)))
        with preserved_state(root), torch.enable_grad() if backward else torch.no_grad():
            for p in saved_grads:
                p.grad = None
            torch.manual_seed(seed)
            context = torch.autocast(device.type, dtype=cast) if cast is not None else nullcontext()
            with context:
                try:
                    output = model(*args)
                except Exception as e:
                    raise input_error(root, args, e) from e
                if backward:
                    target = backward_target(output, None)
            if backward:
                target.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in saved_grads.items():
            p.grad = grad
        if compiled:
            forget_compiled_code()
    return run


def _fresh(x: Any, backward: bool) -> Any:
    """Each run gets its own copy of a tensor input (a model may write into its input)."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().clone()
    return x.requires_grad_(True) if backward and x.is_floating_point() else x


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


# --------------------------------------------------------------------------- comparing
def _compare(a: _Run, b: _Run, phase: str, rtol: float, atol: float) -> tuple[list[ModuleDiff], list[str], list[str]]:
    seen_a = a.outputs if phase == "forward" else a.grads
    seen_b = b.outputs if phase == "forward" else b.grads
    diffs: list[ModuleDiff] = []
    for key, x in seen_a.items():
        y = seen_b.get(key)
        if y is None:
            continue
        base = key.split("#")[0].split("/")[0]
        diffs.append(_diff(len(diffs), key, a.types.get(base, ""), phase, x, y, rtol, atol))
    return diffs, [k for k in seen_a if k not in seen_b], [k for k in seen_b if k not in seen_a]


def _diff(
    index: int, key: str, module_type: str, phase: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float
) -> ModuleDiff:
    """The fingerprint of one pair: equality, max abs/rel difference, cosine."""
    common: dict[str, Any] = dict(
        index=index,
        module=key,
        module_type=module_type,
        phase=phase,
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=str(a.dtype).replace("torch.", ""),
        dtype_b=str(b.dtype).replace("torch.", ""),
    )
    if a.shape != b.shape:
        return ModuleDiff(
            **common,
            exact=False,
            max_abs=math.inf,
            max_rel=math.inf,
            cosine=math.nan,
            diverged=True,
            note=f"shape {list(a.shape)} in A, {list(b.shape)} in B",
        )
    wide = torch.float32 if a.device.type == "mps" else torch.float64  # mps has no float64
    x, y = a.to(wide), b.to(a.device, wide)
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    exact = bool(torch.equal(nan_x, nan_y)) and bool(torch.equal(x.masked_fill(nan_x, 0), y.masked_fill(nan_y, 0)))
    finite_x, finite_y = torch.isfinite(x), torch.isfinite(y)
    both = finite_x & finite_y
    note = "" if common["dtype_a"] == common["dtype_b"] else f"{common['dtype_a']} vs {common['dtype_b']}"
    # NaN/Inf where the other has a finite value (or the other infinity): diverged, whatever the tolerance.
    nonfinite_mismatch = not exact and (
        not torch.equal(finite_x, finite_y) or not torch.equal(x[~both & ~nan_x], y[~both & ~nan_y])
    )
    xs, ys = x[both], y[both]
    max_abs = float((xs - ys).abs().max()) if xs.numel() else 0.0
    scale = float(xs.abs().max()) if xs.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    cosine = math.nan
    if xs.numel() >= COSINE_MIN:
        norms = float(torch.linalg.vector_norm(xs) * torch.linalg.vector_norm(ys))
        if norms > 0:
            cosine = float(torch.dot(xs, ys)) / norms
    if nonfinite_mismatch:
        max_abs = max_rel = math.inf
        note = ", ".join(filter(None, [note, "NaN/Inf in one model only"]))
    diverged = not exact and (nonfinite_mismatch or max_abs > atol + rtol * scale)
    return ModuleDiff(
        **common, exact=exact, max_abs=max_abs, max_rel=max_rel, cosine=cosine, diverged=diverged, note=note
    )

"""Where a training step's memory goes, module by module: parameters, gradients, optimizer state,
and the activations autograd saves for backward.

>>> step = measure_step_memory(model, (x,), optimizer="adam")     # doctest: +SKIP
>>> print(step.table())                                           # doctest: +SKIP

The saved activations are counted, not estimated. While a module's forward runs, every tensor
autograd saves for backward passes through ``torch.autograd.graph.saved_tensors_hooks`` and its
storage is charged to that module (the innermost one running): once per storage, so the views
``q, k, v = qkv.split(...)`` and a tensor saved again by a later module cost what they hold, once.
Parameters and buffers saved for backward (a Linear keeps its weight) are not activations and are
not charged. ``live`` follows the storages autograd still holds, so the peak of a step's saved
bytes, and the module at which it is reached, are measured too.

A module's ``saved`` here is its own: what it saved outside its children. The ``memory/saved/{module}``
scalars of ``watch`` add the children's (what was saved while the module's forward ran).

The predicted peak of a step on any device is parameters and buffers + gradients + optimizer state
+ the peak of saved activations. On CUDA the allocator's own ``max_memory_allocated`` is read beside
it (without resetting the process's peak statistics, which belong to the user: the step's own peak
is known exactly when it set a new record, which the first measured step does).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._torch import queue_after_backward, saved_tensors_hooks_in_use, saved_tensors_hooks_on_top, tensor_version
from ..debugger.alerts import Alert
from ..errors import ConfigError, IntrospectError, ModelTypeError
from ..records.shards import user_type_name
from ..runtime.preserved import preserved_state
from ..runtime.selection import tagged_modules
from ..runtime.tensors import backward_target
from ..terminal import byte_size, format_table

__all__ = [
    "OUTSIDE",
    "OPTIMIZERS",
    "SavedTally",
    "CudaMemory",
    "StepMemory",
    "MemoryGrowth",
    "state_bytes",
    "owned_tensors",
    "measure_step_memory",
    "step_inputs",
    "memory_growth",
    "fit_line",
    "parse_byte_size",
    "is_out_of_memory",
    "raising_module",
    "out_of_memory_alert",
]

OUTSIDE = "(outside the model)"
"""Where tensors saved outside the root's forward (the loss) are charged."""

OPTIMIZERS = ("adam", "adamw", "sgd", "none")
"""The optimizers :func:`measure_step_memory` can build: Adam/AdamW keep two tensors per parameter,
SGD (momentum 0.9) one, "none" takes no optimizer step."""


# --------------------------------------------------------------------------- counting saved tensors
def _storage(tensor: torch.Tensor) -> tuple[tuple[str, int | None, int], int] | None:
    """``(key, bytes)`` of the storage under ``tensor``; None for a tensor without one of its own
    (sparse, a wrapper subclass, an empty tensor)."""
    try:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return None
        return (tensor.device.type, tensor.device.index, ptr), storage.nbytes()
    except Exception:
        return None


class _Saved:
    """What autograd keeps in place of a saved tensor on a measured step: the tensor detached (a
    new tensor object on the same storage: returning the tensor itself would make a reference
    cycle through its own ``grad_fn``) and the version it had, checked when backward reads it."""

    __slots__ = ("tally", "tensor", "key", "version", "producer")

    def __init__(self, tally: SavedTally, tensor: torch.Tensor, key: Any) -> None:
        self.tally = tally
        self.tensor = tensor.detach()
        self.key = key
        try:
            self.version: int | None = tensor_version(tensor)
            fn = tensor.grad_fn
            self.producer = f"output {tensor.output_nr} of {type(fn).__name__}" if fn is not None else "a leaf"
        except Exception:  # a subclass without a version counter
            self.version, self.producer = None, ""

    def __del__(self) -> None:
        if self.key is not None:
            try:
                self.tally.release(self.key)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class SavedTally:
    """The bytes autograd saves for backward during a training step, by the module whose forward
    saved them; storages counted once, parameters and buffers not at all.

    Used by ``measure_step_memory`` and by ``watch(..., log=[..., "memory"])``'s probe. While
    ``recording()`` holds, ``saved_tensors_hooks`` route every saved tensor through ``pack``; the
    module hooks of ``module_hooks()`` keep the stack of running modules. Autograd's own check
    that a saved tensor was not changed in place before backward read it (which it skips for
    tensors that went through hooks) is made by ``unpack`` instead, so a bug that raises without
    the hooks raises with them.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        cuda_device: int | None = None,
        owned: Mapping[str, Sequence[torch.Tensor]] | None = None,
    ) -> None:
        self.modules = modules
        self.owned = owned if owned is not None else owned_tensors(modules)
        """Each module's own parameters and buffers (see :func:`owned_tensors`)."""
        self._exclude = {
            found[0] for tensors in self.owned.values() for t in tensors if (found := _storage(t)) is not None
        }
        self.stack: list[str] = [OUTSIDE]
        self.saved: dict[str, int] = {}
        """The current forward's saved bytes per module (its own, first saver of a storage)."""
        self.forwards: list[dict[str, int]] = []
        """Earlier forwards of the same step (gradient accumulation)."""
        self.live = 0
        self.peak = 0
        self.peak_module = OUTSIDE
        self.live_by_module: dict[str, int] = {}
        self.ran: set[str] = set()
        """The modules whose forward ran while recording."""
        self.recording_now = False
        self.after_backward: Callable[[], None] | None = None
        """Called once when the first backward through this step's saved tensors ends."""
        self.cuda_device = cuda_device
        self.cuda_delta: dict[str, int] = {}
        """On CUDA: what each module's forward left allocated (its children's included), summed over calls."""
        self._cuda_entry: list[int] = []
        self._held: dict[Any, list[Any]] = {}  # storage key -> [references, bytes, module]
        self._backward_seen = False

    # ------------------------------------------------------------ the module stack
    @property
    def current(self) -> str:
        return self.stack[-1]

    def enter(self, name: str) -> None:
        if not self.recording_now:
            return
        self.stack.append(name)
        self.ran.add(name)
        if self.cuda_device is not None:
            self._cuda_entry.append(torch.cuda.memory_allocated(self.cuda_device))

    def leave(self, name: str) -> None:
        if not self.recording_now or len(self.stack) < 2 or name not in self.stack:
            return
        while self.stack[-1] != name:  # a child that raised left no post-hook behind
            self._pop()
        self._pop()

    def _pop(self) -> None:
        name = self.stack.pop()
        if self.cuda_device is not None and self._cuda_entry:
            delta = torch.cuda.memory_allocated(self.cuda_device) - self._cuda_entry.pop()
            self.cuda_delta[name] = self.cuda_delta.get(name, 0) + delta

    def module_hooks(self, skip: nn.Module | None = None) -> list[Any]:
        """Forward pre- and post-hooks (the latter ``always_call``) on every module but ``skip``:
        the caller removes them."""
        handles: list[Any] = []
        try:
            for name, module in self.modules.items():
                if module is skip:
                    continue
                handles.append(module.register_forward_pre_hook(self._enter_hook(name)))
                handles.append(module.register_forward_hook(self._leave_hook(name), always_call=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _enter_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.enter(name)

        return hook

    def _leave_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.leave(name)

        return hook

    # ------------------------------------------------------------ saved tensors
    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Saved tensors counted while it holds (raises ``IntrospectError`` when someone else's
        saved-tensor hooks are in place: ours would replace theirs)."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        if saved_tensors_hooks_in_use():
            raise IntrospectError(
                "saved-tensor hooks of another tool (save_on_cpu, a checkpoint's, your own) are in place; "
                "the saved-activation count would replace them, so it is not taken"
            )
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        self.recording_now = True

    def stop(self) -> None:
        """Pop our saved-tensor hooks, if they are still the innermost pair (a pair pushed after
        ours and never popped stays where its owner left it, and ours under it)."""
        if not self.recording_now:
            return
        self.recording_now = False
        while len(self.stack) > 1:
            self._pop()
        if saved_tensors_hooks_on_top(self.pack):
            self._hooks.__exit__(None, None, None)

    def new_forward(self) -> None:
        """A new forward of the same step: its per-module bytes are kept apart."""
        if self.saved:
            self.forwards.append(self.saved)
            self.saved = {}

    def per_module(self) -> dict[str, int]:
        """The saved bytes per module of the step's largest forward."""
        return max([*self.forwards, self.saved], key=lambda d: sum(d.values()))

    def pack(self, tensor: torch.Tensor) -> _Saved:
        found = _storage(tensor)
        if found is None or found[0] in self._exclude:
            return _Saved(self, tensor, None)
        key, nbytes = found
        held = self._held.get(key)
        if held is not None:
            held[0] += 1
        else:
            module = self.stack[-1]
            self._held[key] = [1, nbytes, module]
            self.saved[module] = self.saved.get(module, 0) + nbytes
            self.live += nbytes
            self.live_by_module[module] = self.live_by_module.get(module, 0) + nbytes
            if self.live > self.peak:
                self.peak, self.peak_module = self.live, module
        return _Saved(self, tensor, key)

    def unpack(self, packed: _Saved) -> torch.Tensor:
        if not self._backward_seen:
            self._backward_seen = True
            if self.after_backward is not None:
                try:
                    queue_after_backward(self.after_backward)
                except RuntimeError:  # read outside a backward (grad_fn._saved_self): no callback
                    self._backward_seen = False
        tensor = packed.tensor
        if packed.version is not None and tensor_version(tensor) != packed.version:
            shape = list(tensor.shape)
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{tensor.type()} {shape}], which is {packed.producer}, is at version "
                f"{tensor_version(tensor)}; expected version {packed.version} instead. Hint: enable anomaly "
                "detection to find the operation that failed to compute its gradient, with "
                "torch.autograd.set_detect_anomaly(True)."
            )
        return tensor

    def release(self, key: Any) -> None:
        held = self._held.get(key)
        if held is None:
            return
        held[0] -= 1
        if held[0] == 0:
            del self._held[key]
            self.live -= held[1]
            self.live_by_module[held[2]] = self.live_by_module.get(held[2], 0) - held[1]


# --------------------------------------------------------------------------- parameters, gradients, state
def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def owned_tensors(modules: Mapping[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Each module's own parameters and buffers; a tied one listed once, under the first module
    that holds it (worked out once by a watch: walking every module's members costs)."""
    owned: dict[str, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        mine = []
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                mine.append(tensor)
        if mine:
            owned[name] = mine
    return owned


def state_bytes(
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    owned: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """``(params, grads, optimizer)``: bytes per module of its own parameters and buffers, their
    gradients and the optimizer's state tensors for them. A tied parameter is charged once, to
    the first module that holds it."""
    params: dict[str, int] = {}
    grads: dict[str, int] = {}
    states: dict[str, int] = {}
    state = getattr(optimizer, "state", None) or {}
    for name, tensors in (owned if owned is not None else owned_tensors(modules)).items():
        for tensor in tensors:
            params[name] = params.get(name, 0) + _nbytes(tensor)
            if isinstance(tensor, nn.Parameter):
                if tensor.grad is not None:
                    grads[name] = grads.get(name, 0) + _nbytes(tensor.grad)
                kept = state.get(tensor)
                if kept:
                    states[name] = states.get(name, 0) + sum(_nbytes(v) for v in kept.values())
    return params, grads, states


# --------------------------------------------------------------------------- the allocator's view
@dataclass(frozen=True)
class CudaMemory:
    """What CUDA's caching allocator says of one device."""

    device: int
    allocated: int
    reserved: int
    max_allocated: int
    step_peak: int | None = None
    """``max_memory_allocated`` during the step, when the step set the process's record (else
    unknown without resetting the user's peak statistics)."""

    @classmethod
    def read(cls, device: int, max_before: int | None = None) -> CudaMemory:
        top = torch.cuda.max_memory_allocated(device)
        return cls(
            device=device,
            allocated=torch.cuda.memory_allocated(device),
            reserved=torch.cuda.memory_reserved(device),
            max_allocated=top,
            step_peak=top if max_before is not None and top > max_before else None,
        )

    def describe(self) -> str:
        free = self.reserved - self.allocated
        text = (
            f"CUDA:{self.device} {byte_size(self.allocated)} allocated of {byte_size(self.reserved)} reserved "
            f"({byte_size(free)} reserved but unallocated)"
        )
        if self.step_peak is not None:
            text += f"; max_memory_allocated in the step {byte_size(self.step_peak)}"
        return text


def cuda_device_of(model: nn.Module) -> int | None:
    """The CUDA device of the model's first parameter or buffer, or None off CUDA."""
    for tensor in (*model.parameters(), *model.buffers()):
        return (tensor.device.index or 0) if tensor.is_cuda else None
    return None


# --------------------------------------------------------------------------- one step's table
@dataclass
class StepMemory:
    """One measured training step, per module (own bytes; see :meth:`table` for the folded view)."""

    modules: list[str]
    types: dict[str, str]
    params: dict[str, int]
    grads: dict[str, int]
    optimizer: dict[str, int]
    saved: dict[str, int]
    peak_saved: int
    peak_module: str
    cuda: CudaMemory | None = None
    cuda_delta: dict[str, int] = field(default_factory=dict)
    step: int | None = None
    optimizer_known: bool = True
    note: str = ""

    @classmethod
    def from_tally(
        cls,
        tally: SavedTally,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        optimizer_known: bool = True,
        cuda: CudaMemory | None = None,
        step: int | None = None,
        note: str = "",
    ) -> StepMemory:
        params, grads, states = state_bytes(tally.modules, optimizer, tally.owned)
        saved = tally.per_module()
        names = list(tally.modules) + ([OUTSIDE] if saved.get(OUTSIDE) else [])
        return cls(
            modules=names,
            types={n: user_type_name(m) for n, m in tally.modules.items()},
            params=params,
            grads=grads,
            optimizer=states,
            saved={n: b for n, b in saved.items() if b},
            peak_saved=tally.peak,
            peak_module=tally.peak_module,
            cuda=cuda,
            cuda_delta=dict(tally.cuda_delta),
            step=step,
            optimizer_known=optimizer_known,
            note=note,
        )

    # ------------------------------------------------------------ totals
    @property
    def param_bytes(self) -> int:
        return sum(self.params.values())

    @property
    def grad_bytes(self) -> int:
        return sum(self.grads.values())

    @property
    def optimizer_bytes(self) -> int:
        return sum(self.optimizer.values())

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    @property
    def predicted_peak(self) -> int:
        """Parameters and buffers + gradients + optimizer state + the peak of saved activations."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.peak_saved

    def saved_with_children(self, name: str) -> int:
        """What ``name`` and the modules below it saved: the bytes saved while its forward ran."""
        prefix = name + "."
        root = self.modules[0] if self.modules else ""
        if name == root:
            return sum(b for n, b in self.saved.items() if n != OUTSIDE)
        return sum(b for n, b in self.saved.items() if n == name or n.startswith(prefix))

    def largest(self, count: int = 3, what: str = "total") -> list[tuple[str, int]]:
        """The modules holding the most (their own bytes): ``what`` is "total" or "saved"."""
        if what == "saved":
            sizes = dict(self.saved)
        else:
            sizes = {
                n: self.params.get(n, 0) + self.grads.get(n, 0) + self.optimizer.get(n, 0) + self.saved.get(n, 0)
                for n in self.modules
            }
        ranked = sorted(((n, b) for n, b in sizes.items() if b > 0), key=lambda item: -item[1])
        return ranked[:count]

    # ------------------------------------------------------------ text
    def table(self, depth: int = 3) -> str:
        """Modules down to ``depth`` (the root is 0), deeper ones folded into their ancestor at
        ``depth`` (torchinfo's convention: every byte in exactly one row), then totals, the peak
        and the largest holders."""
        root = self.modules[0] if self.modules else "model"
        rows: dict[str, list[int]] = {}
        order: list[str] = []
        for name in self.modules:
            if name in (root, OUTSIDE):
                shown = name
            else:
                parts = name.split(".")
                shown = ".".join(parts[: min(len(parts), depth)]) if depth > 0 else root
            values = [
                self.params.get(name, 0),
                self.grads.get(name, 0),
                self.optimizer.get(name, 0),
                self.saved.get(name, 0),
                self.cuda_delta.get(name, 0) if name == shown else 0,
            ]
            if shown not in rows:
                rows[shown] = [0] * 5
                order.append(shown)
            rows[shown] = [a + b for a, b in zip(rows[shown], values)]
        cuda = self.cuda is not None
        headers = ["Module", "Type", "params+buffers", "grads", "optimizer state", "saved for backward"]
        if cuda:
            headers.append("CUDA alloc. delta")

        def cell(value: int) -> str:
            return byte_size(value) if value else "-"

        body = []
        for name in order:
            values = rows[name]
            if not any(values[:4]) and name != root:
                continue
            level = 0 if name in (root, OUTSIDE) else name.count(".") + 1
            line = ["  " * level + name, self.types.get(name, "")] + [cell(v) for v in values[:4]]
            if cuda:
                line.append(byte_size(values[4]) if name in self.cuda_delta else "")
            body.append(line)
        totals = ["Total", "", *(byte_size(v) for v in (self.param_bytes, self.grad_bytes, self.optimizer_bytes))]
        totals.append(byte_size(self.saved_bytes))
        if cuda:
            totals.append("")
        width = len(headers)
        table = format_table(headers, [*body, totals], right=[False, False] + [True] * (width - 2))
        rule = "=" * max(len(line) for line in table.splitlines())
        lines = table.splitlines()
        what = "one training step" if self.step is None else f"training step {self.step}"
        out = [f"Memory of {what} (measured)", rule, lines[0], rule, *lines[1:-1], rule, lines[-1], rule]
        out.append(
            f"Saved for backward at the peak: {byte_size(self.peak_saved)}, reached in {self.peak_module} "
            "(storages counted once; parameters and buffers saved for backward are not activations)"
        )
        state = f" + optimizer state {byte_size(self.optimizer_bytes)}" if self.optimizer_known else ""
        out.append(
            f"Predicted peak: {byte_size(self.predicted_peak)} = params+buffers {byte_size(self.param_bytes)} "
            f"+ grads {byte_size(self.grad_bytes)}{state} + saved activations at their peak {byte_size(self.peak_saved)}"
        )
        if not self.optimizer_known:
            out.append("Optimizer state: not known (pass optimizer= to watch() to see it)")
        holders = ", ".join(f"{n} {byte_size(b)}" for n, b in self.largest(5))
        if holders:
            out.append(f"Largest holders: {holders}")
        if self.cuda is not None:
            out.append(self.cuda.describe())
        if self.note:
            out.append(self.note)
        return "\n".join(out)


# --------------------------------------------------------------------------- measuring a step
def _make_optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    """The optimizer with ``lr=0``: its step builds its state and leaves the weights as they were."""
    if kind == "none" or not params:
        return None
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.0)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.0)
    return torch.optim.SGD(params, lr=0.0, momentum=0.9)


def measure_step_memory(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    optimizer: str = "adam",
) -> StepMemory:
    """Measure one training step of ``model`` on these inputs: forward (in training mode), the
    backward of the output's sum (of its loss, for a model that returns one first), and an
    optimizer step; the per-module table of what it held.

    >>> print(measure_step_memory(net, (torch.randn(8, 3, 32, 32),)).table())   # doctest: +SKIP

    Nothing of the model changes: modes, buffers and RNG are put back (``preserved_state``), the
    gradients it had are restored, and the optimizer steps with ``lr=0`` (it is skipped when a
    gradient is not finite, where ``0 * inf`` would write NaN).

    Raises:
        ConfigError: an unknown ``optimizer``; an output with nothing to backpropagate.
        IntrospectError: another tool's saved-tensor hooks are in place.
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"measure_step_memory() expects an nn.Module, got {type(model).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    modules = tagged_modules(model)
    device = cuda_device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    old_grads = [p.grad for p in params]
    tally = SavedTally(modules, cuda_device=device)
    max_before = torch.cuda.max_memory_allocated(device) if device is not None else None
    handles: list[Any] = []
    note = ""
    try:
        with preserved_state(model), torch.enable_grad():
            model.train()
            for p in params:
                p.grad = None
            handles = tally.module_hooks()
            with tally.recording():
                output = model(*args, **dict(kwargs or {}))
                loss = backward_target(output, None)
                del output
            loss.backward()
            del loss
            opt = _make_optimizer(optimizer, params)
            if opt is not None:
                grads = [p.grad for p in params if p.grad is not None]
                if all(math.isfinite(float(g.float().sum())) for g in grads):
                    opt.step()
                else:
                    note = "The optimizer step was skipped: a gradient holds NaN/Inf (its state is not counted)."
            cuda = CudaMemory.read(device, max_before) if device is not None else None
            result = StepMemory.from_tally(tally, opt, optimizer_known=opt is not None, cuda=cuda, note=note)
            del opt
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, old_grads):
            p.grad = grad
    return result


def step_inputs(model: nn.Module, x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of a training step on ``x``: ``((x,), {})``, or for a model whose forward takes
    ``labels`` and integer token ids (a Hugging Face language model) ``((x,), {"labels": x})``, so
    the step includes the model's own loss, as training does (its logits' softmax is saved too)."""
    try:
        takes_labels = "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_labels = False
    if takes_labels and not x.is_floating_point():
        return (x,), {"labels": x}
    return (x,), {}


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(intercept, slope)`` of the least-squares line through the points."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ConfigError(f"a line needs two different x values, got {list(xs)}")
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


@dataclass
class MemoryGrowth:
    """How a step's memory grows with the batch: one measured step per batch size, and the line
    ``peak = fixed + per_sample * batch`` fitted through their predicted peaks."""

    batch_sizes: list[int]
    steps: list[StepMemory]
    fixed: float | None = None
    per_sample: float | None = None

    def predicted(self, batch: int) -> float | None:
        if self.fixed is None or self.per_sample is None:
            return None
        return self.fixed + self.per_sample * batch

    def largest_batch(self, budget: int) -> int | None:
        """The largest batch whose fitted peak fits ``budget`` bytes (None: no fit, or none fits)."""
        if self.fixed is None or self.per_sample is None or self.per_sample <= 0:
            return None
        batch = math.floor((budget - self.fixed) / self.per_sample)
        return batch if batch >= 1 else None

    def table(self, budget: int | None = None) -> str:
        cuda = all(s.cuda is not None and s.cuda.step_peak is not None for s in self.steps)
        headers = ["batch", "saved activations (peak)", "params+grads+state", "predicted peak"]
        if cuda:
            headers.append("CUDA max_memory_allocated")
        rows = []
        for batch, step in zip(self.batch_sizes, self.steps):
            row = [
                str(batch),
                byte_size(step.peak_saved),
                byte_size(step.predicted_peak - step.peak_saved),
                byte_size(step.predicted_peak),
            ]
            if cuda:
                row.append(byte_size(step.cuda.step_peak))  # type: ignore[union-attr, arg-type]
            rows.append(row)
        lines = [format_table(headers, rows, right=[True] * len(headers))]
        if self.fixed is not None and self.per_sample is not None:
            worst = max(
                abs(s.predicted_peak - self.predicted(b)) / max(s.predicted_peak, 1)  # type: ignore[operator]
                for b, s in zip(self.batch_sizes, self.steps)
            )
            lines.append(
                f"Fit: peak = {byte_size(self.fixed)} + {byte_size(self.per_sample)} x batch "
                f"(least squares over batch sizes {', '.join(map(str, self.batch_sizes))}; "
                f"largest deviation {worst:.1%})"
            )
            if budget is not None:
                fits = self.largest_batch(budget)
                lines.append(
                    f"Largest batch that fits {byte_size(budget)}: {fits:,}"
                    if fits is not None
                    else f"No batch fits {byte_size(budget)}: the fixed part alone is {byte_size(self.fixed)}"
                )
        elif budget is not None:
            lines.append("A budget needs two or more batch sizes to fit a line (--batch-size 1,8,32)")
        return "\n".join(lines)


def memory_growth(
    model: nn.Module,
    inputs_for: Callable[[int], tuple[Sequence[Any], Mapping[str, Any]]],
    batch_sizes: Sequence[int],
    *,
    optimizer: str = "adam",
) -> MemoryGrowth:
    """One measured step per batch size (``inputs_for(batch) -> (args, kwargs)``), and the line
    through their predicted peaks when there are two sizes or more."""
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ConfigError(f"batch sizes are positive integers, got {sizes}")
    steps = [measure_step_memory(model, *inputs_for(b), optimizer=optimizer) for b in sizes]
    growth = MemoryGrowth(sizes, steps)
    if len(set(sizes)) >= 2:
        growth.fixed, growth.per_sample = fit_line(sizes, [s.predicted_peak for s in steps])
    return growth


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """Bytes from ``"24GB"``, ``"24GiB"``, ``"512M"``, ``"1.5e9"``: K, M, G, T are powers of 1024
    (as ``nvidia-smi`` and ``torch.cuda`` count a card's memory), with or without "B"/"iB"."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"a memory size is a number with an optional unit like 24GB, 512MiB or 1.5e9; got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ConfigError(f"a memory size must be at least 1 byte, got {text!r}")
    return int(value)


# --------------------------------------------------------------------------- out of memory
def is_out_of_memory(error: BaseException) -> bool:
    """``torch.OutOfMemoryError``, ``MemoryError``, or a ``RuntimeError`` that says it ran out of
    memory (CPU allocators: "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return "out of memory" in text or "can't allocate memory" in text
    return False


def raising_module(error: BaseException, names: Mapping[int, str]) -> str | None:
    """The innermost module whose ``forward`` the error came out of (from its traceback, whose
    frames are read and let go), or None when it left no module's forward (backward, the loss,
    ``optimizer.step()``)."""
    found = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "forward":
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in names:
                found = names[id(owner)]
        tb = tb.tb_next
    return found


def _holders(sizes: Mapping[str, int], count: int = 3) -> str:
    ranked = sorted(((n, b) for n, b in sizes.items() if b > 0), key=lambda item: -item[1])[:count]
    return ", ".join(f"{n} {byte_size(b)}" for n, b in ranked)


def out_of_memory_alert(
    error: BaseException,
    *,
    step: int,
    where: str | None,
    root: str,
    params: int,
    grads: int,
    optimizer: int | None,
    saved_now: Mapping[str, int] | None = None,
    measured: StepMemory | None = None,
    cuda: CudaMemory | None = None,
) -> Alert:
    """The ``out_of_memory`` finding: where it struck and what the step held at that moment.

    ``saved_now``: the live saved bytes per module when the step was a measured one; else
    ``measured`` (the last measured step) says what a step held, and the message says which.
    """
    kind = (
        type(error).__qualname__
        if type(error).__module__ == "builtins"
        else f"{type(error).__module__}.{type(error).__qualname__}"
    )
    place = (
        f"in the forward of {where}"
        if where
        else "outside any module's forward (the loss, backward or optimizer.step())"
    )
    numbers: dict[str, float] = {"param_bytes": params, "grad_bytes": grads}
    parts = []
    largest = None
    if saved_now is not None:
        total = sum(saved_now.values())
        numbers["saved_bytes"] = total
        largest = _holders(saved_now)
        parts.append(
            f"activations saved for backward so far in this step {byte_size(total)}"
            + (f" (largest: {largest})" if largest else "")
        )
    elif measured is not None:
        numbers["saved_bytes"] = measured.peak_saved
        numbers["measured_step"] = measured.step if measured.step is not None else -1
        largest = _holders(measured.saved)
        parts.append(
            f"activations saved for backward at step {measured.step}, the last measured step: "
            f"{byte_size(measured.peak_saved)} at their peak" + (f" (largest: {largest})" if largest else "")
        )
    else:
        parts.append('saved activations not measured (log=[..., "memory"] measures them on logging steps)')
    state = f"parameters and buffers {byte_size(params)}, gradients {byte_size(grads)}"
    if optimizer is not None:
        numbers["optimizer_bytes"] = optimizer
        state += f", optimizer state {byte_size(optimizer)}"
    else:
        state += ", optimizer state not known (pass optimizer=)"
    parts.append(state)
    if cuda is not None:
        numbers["cuda_allocated"] = cuda.allocated
        numbers["cuda_reserved"] = cuda.reserved
        parts.append(cuda.describe())
    message = (
        f"{kind} {place} at step {step}. Held then: " + "; ".join(parts) + ". Try a smaller batch or sequence, "
        "activation checkpointing around the largest holders, or a lower-precision dtype."
    )
    if where is None:  # the finding belongs to the largest holder when no forward was running
        sizes = saved_now if saved_now is not None else (measured.saved if measured is not None else {})
        where = max(sizes, key=lambda n: sizes[n]) if any(sizes.values()) else root
    return Alert("out_of_memory", where, step, message, numbers, phase="forward" if place.startswith("in") else "")

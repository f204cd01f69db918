"""Every private torch API torch-introspect uses, in one place, each with why and since when.

When torch changes one of these, this is the only file to read. Each function degrades to
"not available" rather than raising where that is safe.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "queue_after_backward",
    "default_store",
    "grad_scaler_scale",
    "file_writer",
    "jit_graph",
    "foreach_norm",
    "any_file_writer",
    "zip_reader",
    "weights_only_unpickle",
    "torchscript_pickle_helpers",
    "operator_schemas",
    "op_schema",
    "higher_order_name",
    "fsdp1_flat_handle",
    "tensor_version",
    "view_base",
    "saved_tensors_hooks_in_use",
    "saved_tensors_hooks_on_top",
    "compiled_autograd_enabled",
    "rehook",
    "forward_hooks_of",
    "post_accumulate_grad_hooks_of",
]


def queue_after_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass finishes (call it from a hook inside backward).

    ``Variable._execution_engine.queue_callback`` (torch >= 1.0, unchanged through 2.14) is the
    only way to run code after the whole backward and before the user's next line: a gradient
    hook fires per tensor, ``register_multi_grad_hook`` needs the tensors up front.
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def default_store() -> Any | None:
    """The default process group's key-value store (a TCPStore under torchrun), or None.

    ``distributed_c10d._get_default_store`` (torch >= 1.8): the store lets ranks exchange a NaN's
    origin without a collective, which could hang when only some ranks take part.
    """
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def grad_scaler_scale(scaler: Any) -> torch.Tensor | None:
    """A ``GradScaler``'s current scale as the device tensor it keeps, without a host sync.

    ``GradScaler._scale`` (torch >= 1.6): the public ``get_scale()`` returns a Python float,
    which would sync the device on every gradient hook.
    """
    scale = getattr(scaler, "_scale", None)  # set by the first scaler.scale(loss)
    return scale if isinstance(scale, torch.Tensor) else None


def file_writer(writer: Any) -> Any | None:
    """The ``FileWriter`` behind a torch ``SummaryWriter`` (None for any other writer).

    ``SummaryWriter._get_file_writer`` (torch >= 1.1): a whole step's values go out as one event
    (``add_summary``) and a graph as one ``add_graph`` call, which the public per-tag methods
    cannot do.
    """
    from torch.utils.tensorboard import SummaryWriter

    get = getattr(writer, "_get_file_writer", None)
    if not isinstance(writer, SummaryWriter) or not callable(get):
        return None
    return get()


def jit_graph(model: torch.nn.Module, args: tuple) -> tuple[Any, Any]:
    """``(GraphDef, RunMetadata)`` of ``model`` traced on ``args``, as ``add_graph`` writes it.

    The same steps as ``torch.utils.tensorboard._pytorch_graph.graph`` (torch >= 1.13), whose
    ``parse`` we call, without the ``print`` it makes on failure: silencing that print would
    mean swapping ``sys.stdout``, which other threads share. ``torch._C._jit_pass_inline``
    inlines submodule calls so TensorBoard shows their ops (what ``add_graph`` does too).
    """
    from tensorboard.compat.proto.config_pb2 import RunMetadata
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from tensorboard.compat.proto.step_stats_pb2 import DeviceStepStats, StepStats
    from tensorboard.compat.proto.versions_pb2 import VersionDef
    from torch.utils.tensorboard._pytorch_graph import parse

    modes = [(m, m.training) for m in model.modules()]
    model.train(False)  # add_graph traces in eval mode
    try:
        trace = torch.jit.trace(model, args, strict=False)
    finally:
        for module, mode in modes:
            module.training = mode
    graph = trace.graph
    torch._C._jit_pass_inline(graph)
    nodes = parse(graph, trace, args)
    stepstats = RunMetadata(step_stats=StepStats(dev_stats=[DeviceStepStats(device="/device:CPU:0")]))
    return GraphDef(node=nodes, versions=VersionDef(producer=22)), stepstats


def foreach_norm(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The L2 norm of each tensor, in one fused kernel launch per device and dtype.

    ``torch._foreach_norm`` (torch >= 1.13; what ``clip_grad_norm_`` uses): one launch for all of a
    model's gradients instead of one per parameter, which matters on every step. ``dtype`` (the
    accumulation and result type; the argument exists since torch 2.3) makes norms of float16 and
    float32 tensors one dtype, so they stack without a cast per tensor.
    """
    if dtype is None or all(t.dtype == dtype for t in tensors):  # (the argument costs a little)
        return list(torch._foreach_norm(tensors))
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    except TypeError:  # torch < 2.3: no dtype argument
        return [n.to(dtype) for n in torch._foreach_norm(tensors)]


def flatten_dense(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat, contiguous copy of many tensors on one device: ``torch._utils._flatten_dense_tensors``
    (torch >= 1.0; DDP's and apex's gradient bucketing), which makes the per-tensor views in C++
    (~0.4 us a tensor on CPU, against ~1 us for ``t.view(-1)`` from Python) and copies them in one
    ``cat``. Dtypes are promoted as ``cat`` promotes them."""
    return torch._utils._flatten_dense_tensors(tensors)


def view_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``tensor`` is a view of (``Tensor._base``, torch >= 0.4; None for a tensor that
    owns its storage): the non-finite check follows ``x.flatten(1)``, ``x.view(...)`` or a slice
    between two modules back to the module whose output it reads."""
    return tensor._base


def tensor_version(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was changed in place (``Tensor._version``, torch >= 0.4; autograd
    uses the same counter to refuse a backward through a tensor changed after it was saved). The
    replay check compares it to tell whether a forward's inputs are still what the forward read."""
    return tensor._version


_NO_ANSWER = object()


def _top_saved_tensors_hooks() -> Any:
    """The innermost ``(pack, unpack)`` pair of this thread, None, or ``_NO_ANSWER``.

    ``torch._C._autograd._top_saved_tensors_default_hooks`` (torch >= 2.1, unchanged through 2.14):
    autograd applies only the innermost pair, so the memory probe must not push its own over
    someone else's (their tensors would stop going where they send them), nor pop someone else's;
    there is no public way to ask.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return _NO_ANSWER
    try:
        return top(True)
    except Exception:
        return _NO_ANSWER


def saved_tensors_hooks_in_use() -> bool:
    """Whether a pair of saved-tensor hooks is set on this thread already (``save_on_cpu``, a
    checkpoint's, the user's own). Where torch cannot say, the answer is "in use": measuring is
    skipped rather than risked."""
    return _top_saved_tensors_hooks() is not None


def saved_tensors_hooks_on_top(pack: Callable[..., Any]) -> bool:
    """Whether ``pack`` is the pack hook of the innermost pair (so popping the pair pops ours)."""
    top = _top_saved_tensors_hooks()
    return isinstance(top, tuple) and bool(top) and top[0] == pack


def any_file_writer(writer: Any) -> Any | None:
    """The ``FileWriter`` of a torch or a tensorboardX ``SummaryWriter`` (None for other writers).

    ``SummaryWriter._get_file_writer`` (torch >= 1.1, tensorboardX >= 1.0): plugin records
    (HPARAMS), whole-step summaries and graphs go through it; the public methods write one tag each.
    """
    get = getattr(writer, "_get_file_writer", None)
    return get() if callable(get) else None


def zip_reader(path: str) -> Any:
    """torch's own zip reader, the one ``torch.load`` and ``torch.export.load`` open files with.

    ``torch._C.PyTorchFileReader`` (torch >= 1.6): checking an archive through the same reader as
    torch sees the same bytes torch will (Python's ``zipfile`` can disagree on odd archives).
    """
    return torch._C.PyTorchFileReader(path)


def weights_only_unpickle(reader: Any, map_location: Any, pickle_file: str = "data.pkl") -> Any:
    """Unpickle ``pickle_file`` of an archive open in ``reader`` with torch's weights-only
    unpickler, its storages read from the archive's ``data/`` records.

    ``torch.serialization._load`` with ``torch._weights_only_unpickler`` (torch >= 1.13; its
    ``weights_only`` keyword since 2.4) is what ``torch.load(weights_only=True)`` does once it has
    opened a zip. ``torch.load`` refuses a TorchScript archive with ``weights_only`` (without it, it
    hands the file to ``torch.jit.load``, which runs the archive's code); called on the archive's
    ``data.pkl`` directly, the same unpickler reads its tensors and runs nothing.
    """
    import inspect

    from torch import _weights_only_unpickler, serialization

    keywords = {"weights_only": True} if "weights_only" in inspect.signature(serialization._load).parameters else {}
    return serialization._load(reader, map_location, _weights_only_unpickler, pickle_file=pickle_file, **keywords)


def torchscript_pickle_helpers() -> list[Callable[..., Any]]:
    """The functions a TorchScript ``data.pkl`` calls besides torch's tensor rebuilders:
    ``torch.jit._pickle.build_intlist`` and its siblings (torch >= 1.2), each of which returns its
    argument as it is (they tag a list's element type for the TorchScript unpickler)."""
    from torch.jit import _pickle

    return [
        _pickle.build_intlist,
        _pickle.build_tensorlist,
        _pickle.build_doublelist,
        _pickle.build_boollist,
        _pickle.restore_type_tag,
    ]


def operator_schemas() -> list[Any]:
    """Every operator schema torch has registered (``torch._C._jit_get_all_schemas``, torch >= 1.4):
    the allowlist of operators an exported program may call is built from their annotations
    (which arguments an operator writes), and no public API lists them."""
    return list(torch._C._jit_get_all_schemas())


def op_schema(target: Any) -> Any | None:
    """The schema of an operator overload (``torch.ops.aten.add_.Tensor``), or None for any other
    graph target. ``OpOverload`` and its ``_schema`` (torch >= 1.13) are how an FX graph names the
    operator a node calls and which of its arguments it writes."""
    from torch._ops import OpOverload

    return target._schema if isinstance(target, OpOverload) else None


def higher_order_name(target: Any) -> str | None:
    """The name of a higher-order operator (``cond``, ``while_loop``: they call subgraphs), or None.
    ``torch._ops.HigherOrderOperator`` (torch >= 2.1) has no public alias."""
    from torch._ops import HigherOrderOperator

    return target.name() if isinstance(target, HigherOrderOperator) else None


def fsdp1_flat_handle(module: Any) -> tuple[bool, list[Any]] | None:
    """``(use_orig_params, the original parameters)`` of an FSDP1 unit, or None when it has none.

    ``FullyShardedDataParallel._handle``, ``._use_orig_params`` and ``flat_param._params``
    (torch >= 2.0): FSDP1 offers no public way to map its flat shard back to the user's parameters.
    """
    handle = getattr(module, "_handle", None)
    if handle is None:
        return None
    orig = bool(getattr(handle, "_use_orig_params", False))
    return orig, list(getattr(handle.flat_param, "_params", None) or []) if orig else []


def compiled_autograd_enabled() -> bool:
    """Whether a backward started inside compiled code runs under compiled autograd.

    ``torch._dynamo.config.compiled_autograd`` (torch >= 2.4; the documented switch, a private
    module): compiled autograd fails on a tensor hook whose tensor gets no gradient (its graph
    pass reads the missing gradient's node, torch 2.14) and refuses ``queue_callback`` unless
    it runs with ``fullgraph=True``, so the non-finite sentinel does without both there. Never
    imports dynamo: without it nothing was compiled.
    """
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None)
    return bool(getattr(config, "compiled_autograd", False))


def forward_hooks_of(module: torch.nn.Module) -> Any:
    """The dict ``module.register_forward_hook`` puts hooks in (``Module._forward_hooks``, an
    attribute since torch 1.0), for :func:`rehook`."""
    return getattr(module, "_forward_hooks", None)


def post_accumulate_grad_hooks_of(tensor: torch.Tensor) -> Any:
    """The dict ``register_post_accumulate_grad_hook`` puts hooks in
    (``Tensor._post_accumulate_grad_hooks``, torch >= 2.1), for :func:`rehook`."""
    return getattr(tensor, "_post_accumulate_grad_hooks", None)


def rehook(handle: Any, hook: Callable[..., Any], hooks: Any) -> bool:
    """Put ``hook`` back where its removed ``handle`` (a ``RemovableHandle``) had it, under the
    same id, when ``hooks`` (the owner's hook dict, from :func:`forward_hooks_of` or
    :func:`post_accumulate_grad_hooks_of`) is still the dict the handle points at; False
    otherwise (register anew then). Why: the per-module and per-parameter hooks of a logging
    step come and go every logging step, and registering makes a handle and three weak
    references per hook each time (hundreds of Python objects per step on a large model, each
    bringing the next garbage collection nearer); a dict entry makes none. The id is the one torch
    gave the handle (ids only grow), so it collides with no other hook; ``handle.remove()`` takes
    it out again. ``RemovableHandle.hooks_dict_ref`` and ``.id``: attributes since torch 1.0."""
    ref = getattr(handle, "hooks_dict_ref", None)
    if ref is None or hooks is None or ref() is not hooks:
        return False
    hooks[handle.id] = hook
    return True

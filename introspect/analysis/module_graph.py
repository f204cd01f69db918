"""A module-level graph for TensorBoard's GRAPHS tab, for models ``torch.jit.trace`` cannot take.

>>> write_module_graph(writer, model, (input_ids,), {"labels": input_ids})   # doctest: +SKIP

Tracing fails on keyword-only inputs, outputs that are not tensors (a Hugging Face ``ModelOutput``
holding a cache, a detector's list of dicts) and data-dependent Python; hooks do not care. One
extra forward of the real batch runs under temporary forward hooks on every module, with training's
state put back afterwards (``preserved_state``: modes, buffers, RNG streams, no autograd). The hooks
record each module call, the shapes of what it read and returned, and, by tensor identity, which
call's output each input was. That becomes a ``GraphDef``:

* one node per module call, nested by dotted name (``transformer/transformer.h/transformer.h.0/...``)
  so TensorBoard groups a block's layers in a box that opens; a module that contains other called
  modules is that box, and its own code (what its ``forward`` computes between its children, e.g.
  attention's softmax) is the node ``<name>.forward`` inside it;
* an edge from the call that produced a tensor to each call that read it, labelled with the shape.
  A tensor no module produced was made by the enclosing module's own code; an output no module
  read went back into it (or was dropped).

It is written the way ``SummaryWriter.add_graph`` writes a traced graph: a ``GraphDef`` event and a
``RunMetadata`` event through the writer's file writer.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._torch import any_file_writer
from ..runtime.preserved import preserved_state
from ..runtime.tensors import named_tensors

__all__ = [
    "MAX_CALLS",
    "ModuleCall",
    "ModuleGraph",
    "record_module_graph",
    "graph_def",
    "write_module_graph",
]

MAX_CALLS = 5000
"""Module calls recorded at most: a recurrent cell looped over a long sequence would otherwise
make a graph TensorBoard cannot lay out. Calls after these are left out (``ModuleGraph.truncated``)."""


Ref = tuple[int, int]
"""``(node, output index)``: node -1 - k is the model's k-th input tensor, node c >= 0 is call c."""


@dataclass
class ModuleCall:
    """One call of one module during the recorded forward."""

    name: str
    """Dotted module name; ``""`` is the root."""
    module_type: str
    extra: str
    parent: int | None
    inputs: list[Ref] = field(default_factory=list)
    """What the call read, in order, without repeats."""
    outputs: list[list[int]] = field(default_factory=list)
    """Shapes of the tensors this call's node made (its own outputs, or for a module with called
    children, what its own code made)."""
    returned: list[Ref] = field(default_factory=list)
    """The tensors the call returned, wherever they were made (a block returns its last layer's)."""
    occurrence: int = 1
    """1 for the module's first call, 2 for its second, ..."""


@dataclass
class ModuleGraph:
    """What the hooks saw: the model inputs, every call, and the model's outputs."""

    root_type: str
    inputs: list[tuple[str, list[int], str]]
    """``(name, shape, dtype)`` of each input tensor, named by position or keyword (``0``, ``labels``)."""
    calls: list[ModuleCall]
    outputs: list[tuple[str, Ref]]
    """``(name, producer)`` of each output tensor of the root."""
    truncated: bool = False


# --------------------------------------------------------------------------- recording
def record_module_graph(
    model: nn.Module, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> ModuleGraph:
    """Run ``model(*args, **kwargs)`` once under temporary hooks and return what they saw.

    Runs in the model's own train/eval mode inside ``preserved_state``; every hook is removed,
    also when the forward raises (the model's error passes through).
    """
    kwargs = dict(kwargs or {})
    recorder = _Recorder()
    for name, tensor in named_tensors(list(args)) + named_tensors(kwargs):  # "0", "0/1", "labels"
        recorder.add_model_input(name, tensor)
    handles: list[Any] = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(recorder.pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook(name)))
        with preserved_state(model):
            output = model(*args, **kwargs)
        outputs = [(path or "0", recorder.resolve(tensor, None)) for path, tensor in named_tensors(output)]
    finally:
        for handle in handles:
            handle.remove()
    return ModuleGraph(type(model).__name__, recorder.inputs, recorder.calls, outputs, recorder.truncated)


class _Recorder:
    """The hooks' shared state: calls so far, the stack of open calls, who produced which tensor."""

    def __init__(self) -> None:
        self.inputs: list[tuple[str, list[int], str]] = []
        self.calls: list[ModuleCall] = []
        self.truncated = False
        self._stack: list[int | None] = []  # None: a call left out (over MAX_CALLS)
        # id(tensor) -> (a weak reference to it, its producer). The reference guards against a
        # freed tensor's id being reused by a new one; holding the tensors would keep every
        # activation of the forward alive.
        self._produced: dict[int, tuple[weakref.ref, Ref]] = {}
        self._seen: dict[str, int] = {}

    def add_model_input(self, name: str, tensor: torch.Tensor) -> Ref:
        known = self._producer(tensor)
        if known is not None:  # the same tensor passed twice (input_ids=x, labels=x): one node
            return known
        ref = (-1 - len(self.inputs), 0)
        self.inputs.append((name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
        self._remember(tensor, ref)
        return ref

    def pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            parent = self._open_call()
            if len(self.calls) >= MAX_CALLS or (self._stack and self._stack[-1] is None):
                self.truncated = self.truncated or len(self.calls) >= MAX_CALLS
                self._stack.append(None)
                return None
            self._seen[name] = self._seen.get(name, 0) + 1
            call = ModuleCall(name, type(module).__name__, _extra(module), parent, occurrence=self._seen[name])
            for _, tensor in named_tensors((args, kwargs)):
                ref = self.resolve(tensor, parent)
                if ref not in call.inputs:
                    call.inputs.append(ref)
            self.calls.append(call)
            self._stack.append(len(self.calls) - 1)
            return None

        return hook

    def post_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            index = self._stack.pop() if self._stack else None
            if index is None:
                return None
            call = self.calls[index]
            for _, tensor in named_tensors(output):
                ref = self._producer(tensor)
                if ref is None:  # new: made by this call (or its own code)
                    ref = self._new_output(index, tensor)
                    self._remember(tensor, ref)
                if ref not in call.returned:
                    call.returned.append(ref)
            return None

        return hook

    def resolve(self, tensor: torch.Tensor, parent: int | None) -> Ref:
        """Who produced ``tensor``: a call, a model input, or else the own code of ``parent``."""
        ref = self._producer(tensor)
        if ref is not None:
            return ref
        if parent is None:  # the root read something it was not given (a user's pre-hook made it)
            return self.add_model_input(str(len(self.inputs)), tensor)
        ref = self._new_output(parent, tensor)
        self._remember(tensor, ref)
        return ref

    def _open_call(self) -> int | None:
        """The innermost recorded call still running (the parent of a call starting now)."""
        return next((i for i in reversed(self._stack) if i is not None), None)

    def _new_output(self, index: int, tensor: torch.Tensor) -> Ref:
        outputs = self.calls[index].outputs
        outputs.append(list(tensor.shape))
        return index, len(outputs) - 1

    def _remember(self, tensor: torch.Tensor, ref: Ref) -> None:
        self._produced[id(tensor)] = (weakref.ref(tensor), ref)

    def _producer(self, tensor: torch.Tensor) -> Ref | None:
        entry = self._produced.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]


def _extra(module: nn.Module) -> str:
    try:
        return module.extra_repr()
    except Exception:  # a user's extra_repr that fails must not cost the graph
        return ""


# --------------------------------------------------------------------------- the GraphDef
def graph_def(graph: ModuleGraph) -> tuple[Any, Any]:
    """``(GraphDef, RunMetadata)`` for ``FileWriter.add_graph``, as ``torch.utils.tensorboard`` makes them."""
    from tensorboard.compat.proto.config_pb2 import RunMetadata
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from tensorboard.compat.proto.step_stats_pb2 import DeviceStepStats, StepStats
    from tensorboard.compat.proto.versions_pb2 import VersionDef

    root = graph.root_type
    called = {c.name for c in graph.calls}
    # A module is a box (a name scope) when any called module sits under it; its calls are then
    # its own code, inside the box. (A name cannot be both a node and a scope in TensorBoard.)
    scopes = {n.rsplit(".", 1)[0] for n in called if "." in n} | ({""} if len(called) > 1 else set())
    for name in list(scopes):
        parts = name.split(".")
        scopes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    names = [_node_name(root, c, c.name in scopes) for c in graph.calls]

    def source(ref: Ref) -> str:
        node, index = ref
        name = f"input/{graph.inputs[-1 - node][0]}" if node < 0 else names[node]
        return name if index == 0 else f"{name}:{index}"

    inputs: list[list[str]] = [[source(r) for r in c.inputs] for c in graph.calls]
    read = {r for c in graph.calls for r in c.inputs} | {r for _, r in graph.outputs}
    for i, call in enumerate(graph.calls):
        for k in range(len(call.outputs)):
            reader = _own_code_reader(graph.calls, call.parent, (i, k)) if (i, k) not in read else None
            if reader is not None:
                inputs[reader].append(source((i, k)))
    nodes = [_node(f"input/{name}", "IO Node", [], [shape], dtype) for name, shape, dtype in graph.inputs]
    for i, call in enumerate(graph.calls):
        if call.name in scopes and not call.outputs:
            continue  # a container whose own code made nothing: its box is enough
        nodes.append(_node(names[i], call.module_type, inputs[i], call.outputs, call.extra))
    shapes = _output_shapes(graph)
    nodes += [
        _node(f"output/{name}", "IO Node", [source(ref)], [shapes.get(ref, [])], "") for name, ref in graph.outputs
    ]
    stats = RunMetadata(step_stats=StepStats(dev_stats=[DeviceStepStats(device="/device:CPU:0")]))
    return GraphDef(node=nodes, versions=VersionDef(producer=22)), stats


def _own_code_reader(calls: list[ModuleCall], parent: int | None, ref: Ref) -> int | None:
    """The call whose own code read an output no module read: the innermost enclosing call that
    did not return it (a block returns its last layer's output; the code around the block reads
    it). None when it is the model's output, or that call's own code made nothing (no node)."""
    while parent is not None and ref in calls[parent].returned:
        parent = calls[parent].parent
    if parent is None or not calls[parent].outputs:
        return None
    return parent


def _output_shapes(graph: ModuleGraph) -> dict[Ref, list[int]]:
    shapes: dict[Ref, list[int]] = {(-1 - k, 0): shape for k, (_, shape, _) in enumerate(graph.inputs)}
    for i, call in enumerate(graph.calls):
        shapes.update({(i, k): shape for k, shape in enumerate(call.outputs)})
    return shapes


def _node_name(root: str, call: ModuleCall, is_scope: bool) -> str:
    """``Root/a/a.b/a.b.c``: every dotted prefix is a scope, so TensorBoard nests the boxes."""
    parts = call.name.split(".") if call.name else []
    scope = "/".join([root, *(".".join(parts[: i + 1]) for i in range(len(parts)))])
    name = f"{scope}/{call.name or root}.forward" if is_scope else scope
    return name if call.occurrence == 1 else f"{name}#{call.occurrence}"


def _node(name: str, op: str, inputs: list[str], shapes: list[list[int]], attr: str) -> Any:
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.node_def_pb2 import NodeDef
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    attrs = {
        "_output_shapes": AttrValue(
            list=AttrValue.ListValue(
                shape=[TensorShapeProto(dim=[TensorShapeProto.Dim(size=d) for d in shape]) for shape in shapes]
            )
        )
    }
    if attr:
        attrs["attr"] = AttrValue(s=attr.encode("utf-8"))
    return NodeDef(name=name, op=op, input=inputs, attr=attrs)


# --------------------------------------------------------------------------- writing
def write_module_graph(
    writer: Any, model: nn.Module, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> ModuleGraph:
    """Record ``model`` on these inputs and write its module-level graph into ``writer``.

    Raises ``TypeError`` when the writer has no file writer to take a ``GraphDef`` (it is not a
    ``torch.utils.tensorboard.SummaryWriter``); the model's own errors pass through.
    """
    file_writer = any_file_writer(writer)
    if file_writer is None:
        raise TypeError(f"{type(writer).__name__} has no file writer to take a GraphDef")
    graph = record_module_graph(model, args, kwargs)
    file_writer.add_graph(graph_def(graph))
    return graph

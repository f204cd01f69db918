"""Which operators an exported program may call: an allowlist built from torch's own schemas.

>>> target_problem("torch.ops.aten.conv2d.default") is None                          # doctest: +SKIP
True
>>> target_problem("torch.ops.aten.from_file.default")                                # doctest: +SKIP
'the operator aten::from_file.default (reads or writes files)'

A ``torch.export`` program is a list of operator calls, and ``torch.export.load`` turns each node's
target string into whatever ``torch.<dotted path>`` names. A name of plain characters is not a safe
operator: ``aten::from_file(filename, shared=True)`` maps any file writable into memory, and
``aten::fill_`` on a slice of it writes bytes there, all from plain aten nodes, when the program
runs. So every node's target, in every graph (the program's and each subgraph a higher-order op
calls), must be on this allowlist: checked on the program's JSON before torch reads it
(:func:`target_problem`) and again on the loaded graphs before anything runs
(:func:`program_problem`).

How the list is built (:func:`allowed_operators`, once per process, from every schema torch has
registered, ``torch._C._jit_get_all_schemas()``):

1. Only the ``aten`` and ``prims`` namespaces, the operators torch itself defines. Custom operators
   (any other namespace, such as ``torch.ops.mylib.*``, and extension targets ``#ns:op``) run their
   author's code: refused.
2. Minus every operator with an effect outside the tensors it is given, by name: file I/O
   (``from_file``, ``save``, anything with ``file``, ``save``, ``mmap`` in its name), printing
   (``_print``, ``warn``), global state (``manual_seed``, ``seed``, ``set_grad_enabled``, cuFFT plan
   caches), storage tricks (``set_``, ``resize_``, ``share_memory_``, ``record_stream``, pinned
   memory) and remote values (``wait``, ``to_here``): :data:`DENIED` and :data:`DENIED_WORDS`.
3. Minus operators on strings: a schema that returns a string, or takes one other than a mode flag
   (``gelu(approximate=)``, ``div(rounding_mode=)``, ``einsum(equation)``, an assert's message:
   :data:`STRING_FLAGS`). A tensor program has no use for building strings, and a string built at
   run time could name a file.
4. An operator that writes one of its arguments (a schema argument annotated ``Tensor(a!)``:
   ``add_``, ``relu_``, ``fill_``, ``copy_``) stays on the list, because exports use them on the
   values they compute (``out += identity`` in a ResNet) and on buffers (BatchNorm's
   ``num_batches_tracked.add_(1)``); but each such node is checked on the loaded graph: it may write
   only values the graph computed or buffers, never (a view of) a parameter, a constant or a user
   input, nor anything inside a higher-order op's subgraph that came from outside it. BatchNorm's
   running statistics count as written (:data:`HIDDEN_WRITES`: ``aten::batch_norm`` updates them in
   training mode, though its schema does not say so).
5. Plus the Python-level operators torch serializes by name for symbolic shapes
   (``_operator.add``, ``math.trunc``, ``torch.sym_max``: arithmetic on integers) and a short list
   of higher-order ops whose bodies are graphs checked the same way (:data:`SAFE_HIGHER_ORDER`:
   ``cond``, ``while_loop``, ``map_impl``, ``scan``, ``associative_scan``, ``invoke_subgraph``,
   ``wrap_with_set_grad_enabled``, ``wrap_with_autocast``). Not ``print``, ``with_effects``,
   ``auto_functionalized`` (custom mutating ops), ``inline_asm_elementwise`` or compiled-code ops.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch

from .._torch import higher_order_name, op_schema, operator_schemas

__all__ = [
    "RISK",
    "DENIED",
    "DENIED_WORDS",
    "STRING_FLAGS",
    "HIDDEN_WRITES",
    "SAFE_HIGHER_ORDER",
    "allowed_operators",
    "target_problem",
    "program_problem",
]

RISK = "can write files or change state outside the model"
"""What running a refused operator could do, for the refusal's message."""

NAMESPACES = ("aten", "prims")

DENIED = frozenset(
    {
        # files and the terminal
        "from_file",
        "save",
        "_print",
        "warn",
        "_test_warn_in_autograd",
        # global state
        "manual_seed",
        "seed",
        "set_grad_enabled",
        "_set_grad_enabled",
        "_cufft_set_plan_cache_max_size",
        "_cufft_clear_plan_cache",
        # storage and memory
        "set_",
        "resize_",
        "resize_as_",
        "_resize_output_",
        "resize_as_sparse_",
        "sparse_resize_",
        "sparse_resize_and_clear_",
        "share_memory_",
        "record_stream",
        "pin_memory",
        "_pin_memory",
        # remote values and futures
        "wait",
        "to_here",
        "local_value",
        "owner",
        "owner_name",
        "is_owner",
        "confirmed_by_owner",
    }
)
"""aten/prims operator names refused whatever their overload."""

DENIED_WORDS = ("file", "save", "mmap", "print", "share_memory", "record_stream")
"""Any operator whose name holds one of these is refused (``_*_from_file`` and its kin)."""

STRING_FLAGS = frozenset(
    {
        "approximate",
        "rounding_mode",
        "mode",
        "padding",
        "pad_mode",
        "padding_side",
        "reduce",
        "equation",
        "indexing",
        "interpolation",
        "side",
        "norm",
        "ord",
        "p",
        "UPLO",
        "driver",
        "algorithm",
        "activation",
        "assert_msg",
        "msg",
        "api_name",
    }
)
"""String arguments that choose a mode of an operator (not data); any other string refuses it."""

HIDDEN_WRITES = frozenset({"running_mean", "running_var"})
"""Arguments written though their schemas do not say so (``aten::batch_norm`` in training mode)."""

SAFE_HIGHER_ORDER = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "invoke_subgraph",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
    }
)
"""Higher-order operators that only call the subgraphs they are given (checked like the program)."""

_SYMBOLIC = (
    operator.eq,
    operator.ne,
    operator.le,
    operator.ge,
    operator.lt,
    operator.gt,
    operator.neg,
    operator.pos,
    operator.mul,
    operator.add,
    operator.sub,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.truediv,
    operator.and_,
    operator.or_,
    operator.lshift,
    operator.rshift,
    operator.getitem,
    math.trunc,
    torch.sym_not,
    torch.sym_int,
    torch.sym_float,
    torch.sym_ite,
    torch.sym_max,
    torch.sym_min,
    torch.sym_sqrt,
)
"""Python functions a graph may call (symbolic-shape arithmetic, and picking an op's output)."""


# --------------------------------------------------------------------------- the list
@functools.lru_cache(maxsize=1)
def allowed_operators() -> frozenset[str]:
    """Every operator a program may name, as torch serializes it (``torch.ops.aten.add.Tensor``)."""
    allowed = set()
    for schema in operator_schemas():
        if _schema_problem(schema) is None:
            allowed.add(_serialized(schema))
    allowed |= {f"torch.ops.higher_order.{name}" for name in SAFE_HIGHER_ORDER}
    allowed |= {_python_name(f) for f in _SYMBOLIC}
    return frozenset(allowed)


def _schema_problem(schema: Any) -> str | None:
    """Why an operator is not on the list (rules 1-3 of the module's docstring), or None."""
    namespace, _, name = schema.name.partition("::")
    if namespace not in NAMESPACES:
        return "a custom operator, outside aten and prims"
    if name in DENIED or any(word in name for word in DENIED_WORDS):
        return "reads or writes files, the terminal or state outside the model"
    if any("str" in str(r.type) for r in schema.returns):
        return "works on strings"
    for argument in schema.arguments:
        if "str" in str(argument.type) and argument.name not in STRING_FLAGS:
            return "takes a string that is not a mode flag"
    return None


def _serialized(schema: Any) -> str:
    return f"torch.ops.{schema.name.replace('::', '.')}.{schema.overload_name or 'default'}"


def _python_name(f: Any) -> str:
    return f"{f.__module__}.{f.__name__}"


@functools.lru_cache(maxsize=1)
def _schemas_by_name() -> dict[str, Any]:
    return {_serialized(s): s for s in operator_schemas()}


# --------------------------------------------------------------------------- the program's JSON
def target_problem(target: str) -> str | None:
    """None when a serialized node target (or an operator argument) is on the allowlist;
    otherwise which operator it is and why it is refused."""
    if target in allowed_operators():
        return None
    shown = target if len(target) <= 80 else target[:77] + "..."
    if target.startswith("torch.ops.higher_order."):
        return f"the higher-order operator {shown} (it may run more than the graphs it is given)"
    schema = _schemas_by_name().get(target)
    if schema is not None:
        return f"the operator {schema.name}.{schema.overload_name or 'default'} ({_schema_problem(schema)})"
    if target.startswith("torch.ops."):
        namespace = target.split(".")[2] if target.count(".") >= 2 else ""
        if namespace not in NAMESPACES:
            return f"the custom operator {shown} (outside aten and prims: its author's code)"
        return f"the operator {shown} (no such operator in this torch)"
    if target.startswith("#"):
        return f"the extension operator {shown} (its author's code)"
    return f"the function {shown} (not an operator on the allowlist)"


# --------------------------------------------------------------------------- the loaded graphs
def program_problem(program: Any) -> str | None:
    """None when every node of every graph of a loaded ``ExportedProgram`` calls an allowed
    operator and writes only values the graph computed or buffers; otherwise the first problem."""
    buffers = {
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind.name == "BUFFER" and hasattr(spec.arg, "name")
    }
    for name, module in program.graph_module.named_modules():
        graph = getattr(module, "graph", None)
        if graph is None:
            continue
        # A subgraph's inputs come from outside it: it may write none of them.
        problem = _graph_problem(graph, buffers if name == "" else set())
        if problem is not None:
            return problem
    return None


def _graph_problem(graph: torch.fx.Graph, writable_inputs: set[str]) -> str | None:
    """The first node that calls an operator off the list or writes a value it may not."""
    protected: set[torch.fx.Node] = set()  # values that are (views of) inputs the graph may not write
    symbolic = set(_SYMBOLIC)
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name not in writable_inputs:
                protected.add(node)
        elif node.op == "get_attr":
            protected.add(node)  # the program's own constants and subgraphs
        elif node.op == "call_function":
            target = node.target
            schema = op_schema(target)
            if schema is not None:
                problem = target_problem(_serialized(schema))
                if problem is not None:
                    return problem
                bound = _bind(schema, node)
                for argument, value in bound:
                    if _writes(argument) and any(n in protected for n in _nodes(value)):
                        return (
                            f"the operator {schema.name}.{schema.overload_name or 'default'} writing in place "
                            f"into {_origin(value, protected)} (in {node.name}): only values the program "
                            "computes and its buffers may be written"
                        )
                if any(r.alias_info is not None for r in schema.returns) and any(
                    a.alias_info is not None and any(n in protected for n in _nodes(v)) for a, v in bound
                ):
                    protected.add(node)  # a view (or the written argument) of a protected value
            elif (hop := higher_order_name(target)) is not None:
                if hop not in SAFE_HIGHER_ORDER:
                    return target_problem(f"torch.ops.higher_order.{hop}")
                if any(n in protected and n.op != "get_attr" for n in _nodes((node.args, node.kwargs))):
                    protected.add(node)  # its operands' views may come back (not its subgraphs)
            elif _hashable(target) and target in symbolic:
                if target is operator.getitem and any(n in protected for n in _nodes(node.args[:1])):
                    protected.add(node)
            else:
                return target_problem(_python_name(target) if callable(target) else str(target))
        elif node.op != "output":  # call_method, call_module: not in an exported program
            return f"a {node.op} node ({node.name}), which no exported program holds"
    return None


def _writes(argument: Any) -> bool:
    """Whether an operator writes this argument: annotated ``Tensor(a!)``, or a running statistic
    (``batch_norm`` and its kin update them in training mode without saying so in their schemas)."""
    info = argument.alias_info
    return (info is not None and info.is_write) or argument.name in HIDDEN_WRITES


def _bind(schema: Any, node: torch.fx.Node) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` for each argument the node passes: positional ones in order,
    keyword ones by name."""
    positional = [a for a in schema.arguments if not a.kwarg_only]
    bound = list(zip(positional, node.args))
    by_name = {a.name: a for a in schema.arguments}
    bound += [(by_name[k], v) for k, v in node.kwargs.items() if k in by_name]
    return bound


def _nodes(value: Any) -> Iterator[torch.fx.Node]:
    """The graph values in an argument (a node, or nodes in lists, tuples and dicts)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.fx.Node):
            yield item
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())


def _origin(value: Any, protected: set[torch.fx.Node]) -> str:
    node = next(n for n in _nodes(value) if n in protected)
    return f"{node.name}, an input of the graph or a view of one"


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True

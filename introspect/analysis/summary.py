"""The torchinfo summary and the TensorBoard graph, taken without disturbing training.

Both run extra forwards of the user's model. Training must not notice: BatchNorm running stats
and other buffers, every module's train/eval flag (torchinfo and ``add_graph`` both call
``model.train(mode)``, which would flatten a frozen-BN-in-eval setup), the CPU and CUDA RNG streams
(dropout) and autograd (everything runs under ``no_grad``) are put back exactly as they were.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import _torch
from ..errors import (
    IntrospectError,
    IntrospectWarning,
    ModelTypeError,
    first_line,
    warn,
)
from ..runtime.preserved import preserved_state
from ..terminal import escape

__all__ = ["model_summary", "summary", "write_graph", "summary_markdown"]

SUMMARY_COLUMNS = ("input_size", "output_size", "num_params", "trainable")
_TRACE_LOCK = threading.Lock()


def model_summary(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    depth: int = 3,
) -> str:
    """The torchinfo table for ``model`` on these real inputs, as text.

    Runs in the model's own mode (train or eval) inside ``preserved_state``. A tied weight (a
    language model's head sharing the embedding matrix) is counted once, as ``model.parameters()``
    counts it, not once per module that holds it. torchinfo's mult-adds are an estimate (a Linear
    counts its parameters once per sample, whatever the number of tokens), labelled so and printed
    as a plain number (torchinfo 1.8 prints its unit as "Units.MEGABYTES" on Python 3.11+); the
    FLOPs per module, forward and backward, counted by ``torch.utils.flop_counter`` on one more
    forward and backward of the same inputs (``introspect.analysis.flops``), follow the table. A
    ``PackedSequence`` input, which torchinfo cannot size, is handed to the model untouched.
    """
    import torchinfo

    kwargs = dict(kwargs or {})
    try:
        with preserved_state(model), _packed_inputs_passed_through(model, list(args), kwargs) as (args, kwargs):
            stats = torchinfo.summary(
                model,
                input_data=args,
                depth=depth,
                col_names=SUMMARY_COLUMNS,
                mode="train" if model.training else "eval",
                verbose=0,
                **kwargs,
            )
    except Exception as e:
        # torchinfo wraps whatever its forward raised in "Failed to run torchinfo ..."
        cause = e.__cause__ if isinstance(e.__cause__, Exception) and "torchinfo" in str(e) else e
        if not _raised_by(cause, torchinfo):
            raise cause  # noqa: B904  (the model's own error, untouched: no __cause__ added)
        raise IntrospectError(
            f"torchinfo cannot summarize {type(model).__name__} on these inputs: "
            f"{type(cause).__name__}: {first_line(cause)[:300]}"
        ) from cause
    # torchinfo keeps every summary in a module-level dict keyed by class name, which would keep
    # the model alive after the run; drop our entry.
    cache = getattr(getattr(torchinfo, "torchinfo", None), "_cached_forward_pass", None)
    if isinstance(cache, dict):
        cache.pop(type(model).__name__, None)
    params = [p for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)]
    stats.total_params = sum(p.numel() for p in params)
    stats.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    stats.total_param_bytes = sum(p.numel() * p.element_size() for p in params)
    stats.formatting.macs_units = torchinfo.Units.NONE
    text = str(stats).replace("Total mult-adds: ", f"{MULT_ADDS_LABEL}: ", 1)
    return text + "\n" + _flops_text(model, args, kwargs, depth)


MULT_ADDS_LABEL = "Total mult-adds (torchinfo's estimate; FLOPs counted below)"


def _flops_text(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], depth: int) -> str:
    """The per-module FLOPs table, or one line saying why there is none (the summary stands without it)."""
    from .flops import count_flops

    try:
        return count_flops(model, args, kwargs).table(depth)
    except Exception as e:
        return f"FLOPs not counted: {type(e).__name__}: {first_line(e)[:200]}"


def _raised_by(error: BaseException, package: Any) -> bool:
    """Whether the innermost frame of ``error``'s traceback outside torch itself is ``package``'s
    (torch's own frames sit between any caller and its failure)."""
    root = os.path.dirname(package.__file__) + os.sep
    torch_root = os.path.dirname(torch.__file__) + os.sep
    tb, files = error.__traceback__, []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    outside_torch = [f for f in files if not f.startswith(torch_root)]
    return bool(outside_torch) and outside_torch[-1].startswith(root)


class _Opaque:
    """A value torchinfo's input walk leaves alone (it would rebuild a ``PackedSequence`` from
    sizes); its input-size total adds it as the bytes of the packed data."""

    def __init__(self, value: PackedSequence) -> None:
        self.value = value

    def __radd__(self, total: int) -> int:
        return total + self.value.data.nbytes


@contextlib.contextmanager
def _packed_inputs_passed_through(
    model: nn.Module, args: list[Any], kwargs: dict[str, Any]
) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """``(args, kwargs)`` with each ``PackedSequence`` wrapped, and a pre-hook on ``model`` that
    unwraps it before the forward (removed afterwards)."""
    if not any(isinstance(v, PackedSequence) for v in (*args, *kwargs.values())):
        yield args, kwargs
        return

    def wrap(v: Any) -> Any:
        return _Opaque(v) if isinstance(v, PackedSequence) else v

    def unwrap_hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
        def unwrap(v: Any) -> Any:
            return v.value if isinstance(v, _Opaque) else v

        return tuple(unwrap(v) for v in hook_args), {k: unwrap(v) for k, v in hook_kwargs.items()}

    handle = model.register_forward_pre_hook(unwrap_hook, with_kwargs=True, prepend=True)
    try:
        yield [wrap(v) for v in args], {k: wrap(v) for k, v in kwargs.items()}
    finally:
        handle.remove()


def summary(model: nn.Module, *inputs: Any, depth: int = 3, **kwargs: Any) -> str:
    """The model summary for real inputs, the way ``watch`` prints it on the first batch.

    >>> print(introspect.summary(net, torch.rand(1, 3, 32, 32)))   # doctest: +SKIP

    Raises ``ModelTypeError`` for a non-module; the model's own errors pass through untouched.
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"summary() expects an nn.Module, got {type(model).__name__}")
    return model_summary(model, inputs, kwargs, depth=depth)


def summary_markdown(text: str) -> str:
    """TensorBoard's text plugin renders markdown: indent the table so it stays a fixed-width block."""
    return "\n".join("    " + line for line in text.splitlines())


def write_graph(writer: Any, model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> bool:
    """The graph of ``model`` on these inputs, in ``writer``'s GRAPHS tab; False (and one warning)
    when none could be written.

    Three tries, the first that works wins: ``SummaryWriter.add_graph``'s trace (with
    ``use_strict_trace=False``, so dict and list outputs are fine); the same trace with the keyword
    arguments passed as inputs of a wrapper (``add_graph`` takes positional inputs only); and, for
    a model ``torch.jit.trace`` cannot take at all (a ``ModelOutput`` holding a cache, a detector's
    list of dicts, data-dependent Python), the module-level graph of ``module_graph.py``, recorded
    by hooks on one more forward of the same inputs. A module-level graph comes with one note on
    stderr, once per model class per process, that says so and why the trace failed.
    """
    from .module_graph import write_module_graph

    kwargs = dict(kwargs or {})
    name = type(model).__name__
    try:
        _trace_graph(
            writer,
            KeywordCall(model, len(args), kwargs) if kwargs else model,
            (*args, *KeywordCall.traced_values(kwargs)),
        )
        return True
    except Exception as e:  # tracing fails on data-dependent control flow, odd outputs, ...
        why = f"tracing {name} failed ({type(e).__name__}: {_gist(e)})"
    try:
        graph = write_module_graph(writer, model, args, kwargs)
    except Exception as e:
        warn(
            f"introspect: graph not written: {why}, and so did recording its module calls "
            f"({type(e).__name__}: {_gist(e)}); training goes on. Pass graph=False to skip it.",
            IntrospectWarning,
        )
        return False
    left_out = f" (the first {len(graph.calls)} module calls)" if graph.truncated else ""
    _note_once(
        f"{type(model).__module__}.{type(model).__qualname__}",
        f"introspect: note: module-level graph written{left_out}: modules, which one's output fed which, "
        f"and shapes, from hooks on one forward; {why}, so there are no operator nodes. Pass "
        "graph=False to skip it.",
    )
    return True


_NOTED_CLASSES: set[str] = set()
"""Model classes whose module-level graph note this process has printed. The graph is written all
the same, so it is information, not a warning: every Hugging Face causal LM (its output holds a
cache ``torch.jit.trace`` cannot take) would otherwise repeat it on every run, and a warning
filter that turned warnings into errors would stop training for it."""


def _note_once(model_class: str, message: str) -> None:
    """``message`` on stderr, the first time ``model_class`` needs it in this process."""
    if model_class in _NOTED_CLASSES:
        return
    _NOTED_CLASSES.add(model_class)
    print(escape(message), file=sys.stderr, flush=True)  # class names may come from a file's code


def _gist(e: BaseException) -> str:
    """The error's first line, short: the tracer quotes whole outputs, tensors and all."""
    text = first_line(e)
    if "tensor(" in text:
        text = text.split("tensor(")[0].rstrip("=( ") + " ..."
    return text if len(text) <= 200 else text[:197] + "..."


class KeywordCall(nn.Module):
    """``model(*args, **kwargs)`` as a module of positional inputs only, for ``add_graph``: the
    tensor keyword arguments become trailing inputs, the others constants of the trace.

    It is the root of the traced graph (``KeywordCall/GPT2Model[model]/...``).
    """

    def __init__(self, model: nn.Module, positional: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # add_graph puts back the wrapper's mode, and with it the model's
        self._positional = positional
        self._traced = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self._constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    @staticmethod
    def traced_values(kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The keyword arguments that are trace inputs, in the order ``forward`` expects them."""
        return [v for v in kwargs.values() if isinstance(v, torch.Tensor)]

    def forward(self, *inputs: Any) -> Any:
        args, values = inputs[: self._positional], inputs[self._positional :]
        return self.model(*args, **self._constants, **dict(zip(self._traced, values)))


def _trace_graph(writer: Any, model: nn.Module, args: tuple) -> None:
    """The jit graph into ``writer``, with training's state put back.

    Tracing warns about every Python branch it freezes (TracerWarning); the warning filters are the
    process's, so their swap is held as short as the trace and one watcher at a time. ``sys.stdout``
    is never swapped: torch's writer is fed through ``_torch.jit_graph``, which does what
    ``add_graph`` does without the ``print`` it makes on failure.
    """
    with _TRACE_LOCK, preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated"
        file_writer = _torch.file_writer(writer)
        if file_writer is not None:
            file_writer.add_graph(_torch.jit_graph(model, tuple(args)))
            return
        try:  # tensorboardX or a user's writer: its own add_graph
            writer.add_graph(model, tuple(args), use_strict_trace=False)
        except TypeError as e:  # an add_graph without use_strict_trace
            if "use_strict_trace" not in str(e):
                raise
            writer.add_graph(model, tuple(args))

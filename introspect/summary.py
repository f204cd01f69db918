"""The torchinfo summary and the TensorBoard graph, taken without disturbing training.

Both run extra forwards of the user's model. Training must not notice: BatchNorm running stats
and other buffers, every module's train/eval flag (torchinfo and ``add_graph`` both call
``model.train(mode)``, which would flatten a frozen-BN-in-eval setup), the CPU and CUDA RNG streams
(dropout) and autograd (everything runs under ``no_grad``) are put back exactly as they were.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import _torch
from .errors import IntrospectWarning, ModelTypeError, first_line, warn

__all__ = ["preserved_state", "model_summary", "summary", "write_graph", "summary_markdown"]

SUMMARY_COLUMNS = ("input_size", "output_size", "num_params", "trainable")
_TRACE_LOCK = threading.Lock()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run side-effect-free forwards: restore modes, buffers and RNG streams afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda_devices = sorted(
        {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda}
    )
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, mode in modes:
            module.training = mode


def model_summary(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    depth: int = 3,
) -> str:
    """The torchinfo table for ``model`` on these real inputs, as text.

    Runs in the model's own mode (train or eval) inside ``preserved_state``.
    """
    import torchinfo

    kwargs = dict(kwargs or {})
    with preserved_state(model):
        stats = torchinfo.summary(
            model,
            input_data=list(args),
            depth=depth,
            col_names=SUMMARY_COLUMNS,
            mode="train" if model.training else "eval",
            verbose=0,
            **kwargs,
        )
    # torchinfo keeps every summary in a module-level dict keyed by class name, which would keep
    # the model alive after the run; drop our entry.
    cache = getattr(getattr(torchinfo, "torchinfo", None), "_cached_forward_pass", None)
    if isinstance(cache, dict):
        cache.pop(type(model).__name__, None)
    return str(stats)


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
    """Trace ``model`` on these inputs into ``writer``'s graph; one warning and False if it cannot."""
    if kwargs:
        warn(
            f"introspect: graph not written: {type(model).__name__}.forward was called with keyword "
            f"arguments {sorted(kwargs)}, which SummaryWriter.add_graph cannot trace; pass graph=False "
            "to silence this", IntrospectWarning)
        return False
    try:
        # Tracing warns about every Python branch it freezes (TracerWarning); the filters are the
        # process's, so their swap is held as short as the trace and one watcher at a time.
        with _TRACE_LOCK, preserved_state(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated"
            file_writer = _torch.file_writer(writer)
            if file_writer is not None:  # torch's SummaryWriter: traced here, without add_graph's print
                file_writer.add_graph(_torch.jit_graph(model, tuple(args)))
            else:  # tensorboardX or a user's writer: its own add_graph
                try:
                    writer.add_graph(model, tuple(args), use_strict_trace=False)
                except TypeError as e:  # an add_graph without use_strict_trace
                    if "use_strict_trace" not in str(e):
                        raise
                    writer.add_graph(model, tuple(args))
    except Exception as e:  # tracing fails on data-dependent control flow, odd outputs, ...
        warn(
            f"introspect: graph not written: tracing {type(model).__name__} failed "
            f"({type(e).__name__}: {first_line(e)[:200]}); training goes on. Pass graph=False to skip it.", IntrospectWarning)
        return False
    return True

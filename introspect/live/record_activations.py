"""Forwards (and optionally backwards) of a saved model through ``watch``, for the command line.

>>> w = record_activations(model, [(torch.rand(8, 3, 32, 32),)], "runs/acts", backward=True)  # doctest: +SKIP
>>> print(w.report())                                                                        # doctest: +SKIP

Each batch is one watched step, logged (``every=1``): activation histograms, and with a backward
the gradients w.r.t. layer outputs and parameters, plus the debugger's findings. Nothing here
installs a hook of its own; ``watch`` does all of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..debugger.alerts import Alert
from ..errors import ModelTypeError
from ..load.model_inputs import input_error
from ..runtime.tensors import backward_target
from ..terminal import progress
from . import Watcher, watch

__all__ = ["record_activations", "unreadable_finding", "ACTIVATION_LOG", "BACKWARD_LOG"]

ACTIVATION_LOG: tuple[str, ...] = ("activations", "feature_maps")
"""What every batch logs: histograms, and each conv layer's channels for the batch's first input."""
BACKWARD_LOG: tuple[str, ...] = ("activation_grads", "grads")
"""What a batch with a backward logs in addition."""


def unreadable_finding(files: Sequence[tuple[str, str]], step: int, shown: int = 5) -> Alert:
    """The ``data_unreadable`` finding of input files left out: the first ``shown`` by path, and why
    the first could not be read."""
    paths = [path for path, _ in files]
    more = f" (+{len(paths) - shown} more)" if len(paths) > shown else ""
    first, why = files[0]
    return Alert(
        "data_unreadable",
        ", ".join(paths[:shown]) + more,
        step,
        f"{len(paths)} input file{'s' if len(paths) != 1 else ''} could not be read and "
        f"{'were' if len(paths) != 1 else 'was'} skipped ({first}: {why})",
        {"samples": float(len(paths))},
    )


def record_activations(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    logdir: str | os.PathLike | Any,
    backward: bool = False,
    target: int | None = None,
    train_mode: bool = False,
    show_progress: bool = False,
    total: int | None = None,
    unreadable: Sequence[tuple[str, str]] = (),
) -> Watcher:
    """Run each batch of positional inputs through ``model`` under ``watch``; returns the closed watcher.

    Args:
        batches: the model's positional inputs, one sequence per forward.
        logdir: a log directory or a SummaryWriter.
        backward: after each forward, backpropagate the sum of the output (of its first floating
            tensor, for a tuple or dict output) — or of unit ``target`` of its last dimension,
            e.g. one class's logit.
        train_mode: run in training mode (dropout on, BatchNorm on batch statistics, updating its
            running statistics in memory). By default every layer runs as in inference.
        unreadable: ``(path, why)`` of the input files left out as unreadable, filled in while
            ``batches`` are read (``ModelBatches.skipped``): one ``data_unreadable`` finding
            names them, as ``introspect data`` does.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelTypeError(
            "a TorchScript model runs its layers in C++, where Python hooks cannot see them; load its "
            "weights into the Python architecture with --arch package.module:Class (arch=...), or "
            "use a torch.export .pt2"
        )
    modes = [(m, m.training) for m in model.modules()]
    model.train(train_mode)
    # watch() counts a step per training-mode forward of the root; only the root's own flag is set,
    # so every layer below keeps its inference behaviour (no dropout, BatchNorm running statistics).
    model.training = True
    log = ACTIVATION_LOG + (BACKWARD_LOG if backward else ())
    try:
        with watch(
            model, logdir, every=1, image_every=1, log=log, summary=False, graph=False, on_nonfinite="ignore"
        ) as w:
            for inputs in progress(batches, show_progress, total=total, desc="batches", unit="batch"):
                inputs = tuple(
                    x.detach().requires_grad_(True)
                    if backward and isinstance(x, torch.Tensor) and x.is_floating_point()
                    else x
                    for x in inputs
                )
                with torch.enable_grad():
                    try:
                        output = model(*inputs)
                    except Exception as e:
                        raise input_error(model, inputs, e) from e
                    if backward:
                        model.zero_grad(set_to_none=True)
                        backward_target(output, target).backward()
                del output
            if unreadable:
                w.findings.add(unreadable_finding(unreadable, w.step))
    finally:
        for module, mode in modes:
            module.training = mode
        model.zero_grad(set_to_none=True)
    return w

"""Live watching: ``watch()`` puts hooks on a model for the length of a ``with`` block.

The package's rooms: ``config`` (the options, validated and frozen before any hook exists),
``clock`` (which step a forward belongs to), ``signals`` (SIGTERM/SIGINT deferred to a safe
point), ``dispatch`` (a step's events to the probes), ``watcher`` (the hooks and their lifecycle)
and ``record_activations`` (watching a model over a set of inputs, for the CLI). The concerns
themselves live in ``introspect.probes``; what is changed in the process is kept in
``introspect.runtime.registry`` and undone in reverse order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..debugger.health import Thresholds
from ..probes.base import Probe
from ..records.budget import DEFAULT_MAX_MODULES
from ..records.findings import logger
from ..runtime.selection import ModuleFilter
from .config import (
    DEFAULT_EVERY,
    DEFAULT_LOG,
    IMAGE_EVERY_FACTOR,
    LOG_KINDS,
    NONFINITE_ACTIONS,
    WATCH_OPTIONS,
    WatchConfig,
)
from .watcher import Watcher

__all__ = [
    "watch",
    "Watcher",
    "Probe",
    "WatchConfig",
    "LOG_KINDS",
    "DEFAULT_LOG",
    "DEFAULT_EVERY",
    "IMAGE_EVERY_FACTOR",
    "NONFINITE_ACTIONS",
    "WATCH_OPTIONS",
    "logger",
]


def watch(
    model: nn.Module,
    writer: Any = None,
    *,
    every: int = DEFAULT_EVERY,
    log: str | Iterable[str] = DEFAULT_LOG,
    include: ModuleFilter = None,
    exclude: ModuleFilter = None,
    max_modules: int | None = DEFAULT_MAX_MODULES,
    optimizer: torch.optim.Optimizer | None = None,
    on_nonfinite: str = "warn",
    check_every: int = 1,
    check_mode: str = "replay",
    thresholds: Thresholds | Mapping[str, float] | None = None,
    summary: bool = True,
    graph: bool = True,
    hparams: Mapping[str, Any] | None = None,
    step_fn: Callable[[], int] | None = None,
    image_every: int | None = None,
    log_inputs: bool = False,
    ranks: str = "zero",
    grad_scaler: Any = None,
    strict: bool = False,
    probes: Iterable[Probe] | None = None,
) -> Watcher:
    """Watch ``model`` train: per-layer histograms, gradients, weights, summary, graph, NaN origin.

    >>> with watch(model, SummaryWriter("runs/exp1")) as w:       # doctest: +SKIP
    ...     for x, y in loader:
    ...         loss = loss_fn(model(x), y)
    ...         opt.zero_grad(); loss.backward(); opt.step()
    ...         writer.add_scalar("loss", loss.item(), w.step)
    >>> print(w.report())                                          # doctest: +SKIP

    Hooks are attached at once (so ``w = watch(...)`` without ``with`` works too; call
    ``w.close()`` when done) and removed on exit, including on exceptions and Ctrl-C.

    Args:
        model: any ``nn.Module``; DataParallel/DDP and ``torch.compile`` wrappers are unwrapped.
        writer: a ``SummaryWriter`` (torch or tensorboardX; flushed, never closed, on exit), a
            log directory (a writer is made and closed), or None for ``runs/<time>``.
        every: log every N steps (step 0 always). Off-cadence steps cost a hook call and one sum
            per output.
        log: what to capture on logging steps: any of "activations", "activation_grads",
            "weights", "grads", "feature_maps" (conv layers' channels as an image grid; 1-D
            convolutions and RNN/attention sequence outputs as a heat map; at ``image_every``),
            "health_map" (every module over the logging steps, one picture per statistic);
            opt-in: "memory" (per-module parameters, gradients, optimizer
            state and activations saved for backward, measured on logging steps: the
            ``memory/saved/{module}`` scalars and the ``model/memory`` table, printed for the
            first one with ``summary``). Whatever ``log`` says, an out-of-memory error under
            ``watch`` is reported (``out_of_memory``) with what the step held, and raised as it was.
        image_every: draw feature maps every N steps (step 0 always); default ``10 * every``.
            Only the first sample's slice (at most 64 channels) is copied on those steps.
        log_inputs: on the first training batch, write the model's input as an image grid
            (``data/inputs``, for image-like N x C x H x W tensors) and report NaN/Inf, constant
            images, 0-255 values and duplicates in it as findings.
        include / exclude: module-name globs (``"features.*"``) or module types; default is
            every module that owns parameters plus every leaf.
        max_modules: above this many watched modules, per-module histograms and scalars are
            written for this many only (every ``include``d module, those named in findings, an
            evenly spaced sample); every module stays on the health map and in the per-block
            roll-ups (``blocks/{stat}/{block}``), and a run writes at most
            ``introspect.records.budget.TAG_CEILING`` tags. None: every module's tags, no ceiling.
        optimizer: count one step per ``optimizer.step()`` (gradient accumulation) and log
            ``update_ratio/{param}``.
        on_nonfinite: "warn" (once per origin), "raise" (``NonFiniteError``) or "ignore".
        check_every: run the non-finite check every N steps (0: never).
        check_mode: "replay": a sentinel per step (norms of the outputs, the gradient arriving at
            them and the parameter gradients: one host sync) and, only when it sees NaN/Inf, a
            replay of that step with every watched module checked. "per_module": every module on
            every step, for steps that cannot be replayed (docs/debugger.md: "First NaN/Inf").
        thresholds: when the debugger reports dead units, saturation, vanishing/exploding or
            stuck gradients: an ``introspect.Thresholds`` or a dict of its field names.
        summary / graph: print the torchinfo summary and write the graph on the first batch.
        hparams: the run's hyperparameters (a dict of JSON-like values) for TensorBoard's HPARAMS
            dashboard, in the same run; give the final metrics with ``w.finish(metrics={...})``.
        step_fn: follow an external step counter (a trainer's ``global_step``): training
            forwards while it returns n make step n, whether or not the root itself is called.
        ranks: under torch.distributed, "zero" (rank 0 writes) or "all" (every rank writes its
            own run in a ``rank{k}`` subdirectory of the log directory). Every rank runs the
            non-finite check on its own tensors; a NaN that DDP spreads to every rank's averaged
            gradients is reported with the rank it came from.
        grad_scaler: the ``torch.amp.GradScaler`` in use: NaN/Inf in the scaled gradients is then
            a ``grad_overflow`` finding (the scaler skips that step), not a non-finite origin, and
            gradient histograms are unscaled.
        strict: a probe that fails on a module raises ``introspect.ProbeError`` instead of
            warning once and stopping (for tests and CI).
        probes: your own statistics, as ``introspect.Probe`` instances: each value their
            ``on_output`` (or ``on_output_grad``) returns on a logging step is written as the
            scalar ``{probe.name}/{key}/{module}``.

    Every option is checked (``ConfigError``, or ``ConfigTypeError`` for a wrong type) before a
    single hook exists. SIGTERM and Ctrl-C while watching take effect at the next step boundary
    (at most ``introspect.live.signals.GRACE_S`` seconds later): the completed steps are written
    first, then the signal does what it would have done without ``watch``.

    A compiled model (``torch.compile``, before or after ``watch``) keeps its step clock, weights,
    gradients and update ratios; its per-layer probes cannot run inside the graph and one warning
    says so.
    """
    options = dict(locals())  # the first statement: exactly watch()'s parameters, as called
    del options["model"], options["writer"]
    config = WatchConfig.validate(model, writer, **options)
    return Watcher(model, writer, config)

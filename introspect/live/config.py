"""``watch``'s options, checked and frozen before a single hook exists.

Every check echoes the bad value and says what would be accepted (torchinfo's habit). A wrong
*type* (``log=None``, ``writer=42``) is a :class:`ConfigTypeError`, which is a ``TypeError`` too;
a wrong *value* (``every=0``) is a :class:`ConfigError`, which is a ``ValueError``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..debugger.health import Thresholds
from ..errors import ConfigError, ConfigTypeError, ModelTypeError
from ..records.run_params import check_hparams
from ..runtime.amp import check_grad_scaler
from ..runtime.distributed import check_rank_mode
from ..runtime.selection import ModuleFilter

__all__ = [
    "WatchConfig",
    "LOG_KINDS",
    "DEFAULT_LOG",
    "DEFAULT_EVERY",
    "IMAGE_EVERY_FACTOR",
    "NONFINITE_ACTIONS",
    "CHECK_MODES",
    "read_step",
]

LOG_KINDS = ("activations", "activation_grads", "weights", "grads", "feature_maps", "health_map", "memory")
DEFAULT_LOG = LOG_KINDS[:5]
"""Opt-in: the health map (its pictures cost ~1 s, see probes/health_map.py) and memory (saved-tensor
hooks on logging steps, see probes/step_memory.py)."""
DEFAULT_EVERY = 50
IMAGE_EVERY_FACTOR = 10  # image_every defaults to 10 x every: one picture costs ~10-20 ms (PNG + checksum)
NONFINITE_ACTIONS = ("warn", "raise", "ignore")
CHECK_MODES = ("replay", "per_module")
"""How the non-finite check runs: a per-step sentinel that replays a step only when it fires
(``introspect.probes.nonfinite.sentinel``), or the per-module check on every step."""


def _count(value: Any, name: str, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{name} must be an integer >= {minimum} ({meaning}), got {name}={value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} ({meaning}), got {name}={value!r}")
    return value


def _log_kinds(log: Any) -> frozenset[str]:
    if isinstance(log, str):
        kinds: tuple[Any, ...] = (log,)
    elif isinstance(log, Iterable) and not isinstance(log, (bytes, Mapping)):
        kinds = tuple(log)
    else:
        raise ConfigTypeError(f"log= takes a kind name or a list of them from {list(LOG_KINDS)}, got log={log!r}")
    wrong = [k for k in kinds if not isinstance(k, str)]
    if wrong:
        raise ConfigTypeError(f"log= takes kind names (strings) from {list(LOG_KINDS)}, got {wrong}")
    unknown = [k for k in kinds if k not in LOG_KINDS]
    if unknown:
        raise ConfigError(f"log= got unknown kinds {unknown}; choose from {list(LOG_KINDS)}")
    return frozenset(kinds)


def _check_writer(writer: Any) -> None:
    """The writer's kind only; opening it (and a path that is a file) is for ``sinks.open_writer``."""
    if writer is None or isinstance(writer, (str, os.PathLike)):
        return
    if not callable(getattr(writer, "add_scalar", None)):
        raise ConfigTypeError(
            f"writer must be a SummaryWriter (torch.utils.tensorboard or tensorboardX), a log "
            f"directory path, or None; got {type(writer).__name__} ({writer!r:.60})"
        )


def read_step(step_fn: Callable[[], int]) -> int:
    """The external counter's value, checked: a step is an integer >= 0."""
    if not callable(step_fn):
        raise ConfigTypeError(f"step_fn must be a callable returning the current step, got {step_fn!r}")
    try:
        step = operator.index(step_fn())
    except TypeError as e:
        raise ConfigError(f"step_fn must return an integer step >= 0: {e}") from None
    if step < 0:
        raise ConfigError(f"step_fn must return an integer step >= 0, got {step}")
    return step


@dataclass(frozen=True)
class WatchConfig:
    """The options of one ``watch``, validated (see :func:`introspect.watch` for each)."""

    every: int = DEFAULT_EVERY
    log: frozenset[str] = frozenset(DEFAULT_LOG)
    include: ModuleFilter = None
    exclude: ModuleFilter = None
    optimizer: Any = None
    on_nonfinite: str = "warn"
    check_every: int = 1
    check_mode: str = "replay"
    thresholds: Thresholds = Thresholds()
    summary: bool = True
    graph: bool = True
    hparams: Mapping[str, Any] | None = None
    """Flattened to TensorBoard's value kinds (``hparams.check_hparams``)."""
    step_fn: Callable[[], int] | None = None
    image_every: int = IMAGE_EVERY_FACTOR * DEFAULT_EVERY
    log_inputs: bool = False
    ranks: str = "zero"
    grad_scaler: Any = None
    strict: bool = False
    probes: tuple[Any, ...] = ()

    @classmethod
    def validate(
        cls,
        model: Any,
        writer: Any,
        *,
        every: int,
        log: str | Iterable[str],
        include: ModuleFilter,
        exclude: ModuleFilter,
        optimizer: torch.optim.Optimizer | None,
        on_nonfinite: str,
        check_every: int,
        check_mode: str,
        thresholds: Thresholds | Mapping[str, float] | None,
        summary: bool,
        graph: bool,
        hparams: Mapping[str, Any] | None,
        step_fn: Callable[[], int] | None,
        image_every: int | None,
        log_inputs: bool,
        ranks: str,
        grad_scaler: Any,
        strict: bool,
        probes: Iterable[Any] | None,
    ) -> WatchConfig:
        """Every check ``watch`` makes, in one place, before it touches the model."""
        from ..probes.base import Probe

        if not isinstance(model, nn.Module):
            raise ModelTypeError(
                f"watch() expects a torch.nn.Module, got {type(model).__name__}; pass the model "
                "itself (e.g. watch(net, writer)), not its output or state_dict"
            )
        _check_writer(writer)
        _count(every, "every", 1, "log every N steps")
        _count(check_every, "check_every", 0, "0 turns the non-finite check off")
        if image_every is None:
            image_every = IMAGE_EVERY_FACTOR * every
        _count(image_every, "image_every", 1, "draw feature maps every N steps")
        kinds = _log_kinds(log)
        if not isinstance(check_mode, str):
            raise ConfigTypeError(f"check_mode= takes one of {CHECK_MODES}, got {type(check_mode).__name__}")
        if check_mode not in CHECK_MODES:
            raise ConfigError(f"check_mode must be one of {CHECK_MODES}, got {check_mode!r}")
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ConfigError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise ConfigTypeError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for flag, value in (("summary", summary), ("graph", graph), ("log_inputs", log_inputs), ("strict", strict)):
            if not isinstance(value, bool):
                raise ConfigTypeError(f"{flag}= takes True or False, got {flag}={value!r}")
        limits = Thresholds.coerce(thresholds)
        if hparams is not None:  # a value TensorBoard cannot show fails here, with one warning
            hparams = check_hparams(hparams)
        if step_fn is not None:
            read_step(step_fn)  # a counter that cannot be read fails here, not inside a hook
        check_rank_mode(ranks)
        check_grad_scaler(grad_scaler)
        user_probes = tuple(probes or ())
        for probe in user_probes:
            if not isinstance(probe, Probe):
                raise ConfigTypeError(
                    f"probes= takes introspect.Probe instances, got {type(probe).__name__} ({probe!r:.60})"
                )
            name = getattr(probe, "name", "")
            if not isinstance(name, str) or not name or "/" in name:
                raise ConfigError(
                    f"{type(probe).__name__}.name must be a non-empty tag prefix without '/', got {name!r}"
                )
        names = [p.name for p in user_probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"probes= got two probes with one name: {sorted(names)}; names are tag prefixes")
        return cls(
            every=every,
            log=kinds,
            include=include,
            exclude=exclude,
            optimizer=optimizer,
            on_nonfinite=on_nonfinite,
            check_every=check_every,
            check_mode=check_mode,
            thresholds=limits,
            summary=summary,
            graph=graph,
            hparams=hparams,
            step_fn=step_fn,
            image_every=image_every,
            log_inputs=log_inputs,
            ranks=ranks,
            grad_scaler=grad_scaler,
            strict=strict,
            probes=user_probes,
        )

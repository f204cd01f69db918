"""``watch``'s options, checked and frozen before a single hook exists.

Every check echoes the bad value and says what would be accepted (torchinfo's habit). A wrong
*type* (``log=None``, ``writer=42``) is a :class:`ConfigTypeError`, which is a ``TypeError`` too;
a wrong *value* (``every=0``) is a :class:`ConfigError`, which is a ``ValueError``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..debugger.health import Thresholds
from ..errors import ConfigError, ConfigTypeError, ModelTypeError
from ..probes.base import Probe
from ..records.budget import DEFAULT_MAX_MODULES
from ..records.run_params import check_hparams
from ..runtime.amp import check_grad_scaler
from ..runtime.distributed import check_rank_mode
from ..runtime.selection import ModuleFilter

__all__ = [
    "WatchConfig",
    "Option",
    "OPTIONS",
    "WATCH_OPTIONS",
    "LOG_KINDS",
    "DEFAULT_LOG",
    "DEFAULT_EVERY",
    "IMAGE_EVERY_FACTOR",
    "NONFINITE_ACTIONS",
    "CHECK_MODES",
    "read_step",
]

LOG_KINDS = ("activations", "activation_grads", "weights", "grads", "feature_maps", "health_map", "memory")
DEFAULT_LOG = LOG_KINDS[:6]
"""Everything but memory, which is opt-in (saved-tensor hooks on logging steps, see
probes/step_memory.py). The health map is on: its cost is measured in probes/health_map.py."""
DEFAULT_EVERY = 50
IMAGE_EVERY_FACTOR = 10  # image_every defaults to 10 x every: one picture costs ~10-20 ms (PNG + checksum)
NONFINITE_ACTIONS = ("warn", "raise", "ignore")
CHECK_MODES = ("replay", "per_module")
"""How the non-finite check runs: a per-step sentinel that replays a step only when it fires
(``introspect.probes.nonfinite.sentinel``), or the per-module check on every step."""


# --------------------------------------------------------------------------- the checks
# Each check takes the option's name, the value given and the options checked before it (in
# declaration order), and returns the value kept; a wrong type raises ConfigTypeError, a wrong
# value ConfigError, each echoing the bad value.
Check = Callable[[str, Any, Mapping[str, Any]], Any]


def _kept(name: str, value: Any, checked: Mapping[str, Any]) -> Any:
    """No check here: the value is checked where it is used (``include``/``exclude`` need the model)."""
    return value


def _count(minimum: int, meaning: str) -> Check:
    def check(name: str, value: Any, checked: Mapping[str, Any]) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{name} must be an integer >= {minimum} ({meaning}), got {name}={value!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum} ({meaning}), got {name}={value!r}")
        return value

    return check


def _max_modules(name: str, value: Any, checked: Mapping[str, Any]) -> int | None:
    if value is None:
        return None
    return _count(1, "None writes every module's tags")(name, value, checked)


def _image_every(name: str, value: Any, checked: Mapping[str, Any]) -> int:
    if value is None:
        value = IMAGE_EVERY_FACTOR * checked["every"]
    return _count(1, "draw feature maps every N steps")(name, value, checked)


def _flag(name: str, value: Any, checked: Mapping[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name}= takes True or False, got {name}={value!r}")
    return value


def _log_kinds(name: str, log: Any, checked: Mapping[str, Any]) -> frozenset[str]:
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


def _optimizer(name: str, optimizer: Any, checked: Mapping[str, Any]) -> Any:
    if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise ConfigTypeError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _on_nonfinite(name: str, action: Any, checked: Mapping[str, Any]) -> str:
    if action not in NONFINITE_ACTIONS:
        raise ConfigError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {action!r}")
    return action


def _check_mode(name: str, mode: Any, checked: Mapping[str, Any]) -> str:
    if not isinstance(mode, str):
        raise ConfigTypeError(f"check_mode= takes one of {CHECK_MODES}, got {type(mode).__name__}")
    if mode not in CHECK_MODES:
        raise ConfigError(f"check_mode must be one of {CHECK_MODES}, got {mode!r}")
    return mode


def _thresholds(name: str, value: Any, checked: Mapping[str, Any]) -> Thresholds:
    return Thresholds.coerce(value)


def _hparams(name: str, hparams: Any, checked: Mapping[str, Any]) -> dict[str, Any] | None:
    # A value TensorBoard cannot show fails here, with one warning.
    return None if hparams is None else check_hparams(hparams)


def _step_fn(name: str, step_fn: Any, checked: Mapping[str, Any]) -> Callable[[], int] | None:
    if step_fn is not None:
        read_step(step_fn)  # a counter that cannot be read fails here, not inside a hook
    return step_fn


def _ranks(name: str, ranks: Any, checked: Mapping[str, Any]) -> str:
    return check_rank_mode(ranks)


def _grad_scaler(name: str, scaler: Any, checked: Mapping[str, Any]) -> Any:
    return check_grad_scaler(scaler)


def _probes(name: str, probes: Any, checked: Mapping[str, Any]) -> tuple[Probe, ...]:
    user_probes = tuple(probes or ())
    for probe in user_probes:
        if not isinstance(probe, Probe):
            raise ConfigTypeError(
                f"probes= takes introspect.Probe instances, got {type(probe).__name__} ({probe!r:.60})"
            )
        name = getattr(probe, "name", "")
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{type(probe).__name__}.name must be a non-empty tag prefix without '/', got {name!r}")
    names = [p.name for p in user_probes]
    if len(set(names)) != len(names):
        raise ConfigError(f"probes= got two probes with one name: {sorted(names)}; names are tag prefixes")
    return user_probes


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"watch() expects a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself (e.g. watch(net, writer)), not its output or state_dict"
        )


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


# --------------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Option:
    """One keyword option of ``watch``, declared once.

    ``accepts`` and ``default`` are ``watch()``'s annotation and default for it (a test holds the
    signature to them), ``check`` turns the value given into the value kept, ``doc`` says in one
    line what it does, and ``shown`` is the default as the docs' options table writes it, where
    that is not the literal value.
    """

    accepts: Any
    default: Any
    check: Check
    doc: str
    shown: str | None = None

    @property
    def shown_default(self) -> str:
        """The docs table's default cell: ``shown``, else the literal, e.g. ``50`` or ``"warn"``."""
        if self.shown is not None:
            return self.shown
        return f'`"{self.default}"`' if isinstance(self.default, str) else f"`{self.default!r}`"


def option(accepts: Any, default: Any, check: Check, doc: str, shown: str | None = None) -> Any:
    """A ``WatchConfig`` field declaring one option (the dataclass field itself has no default:
    ``WatchConfig.validate`` always passes every checked value)."""
    return field(metadata={"option": Option(accepts, default, check, doc, shown)})


@dataclass(frozen=True)
class WatchConfig:
    """The options of one ``watch``, validated (see :func:`introspect.watch` for each).

    Each field is the one declaration of a ``watch`` option (:class:`Option` in its metadata); the
    field's type is the value kept, ``Option.accepts`` what ``watch`` takes.
    """

    every: int = option(int, DEFAULT_EVERY, _count(1, "log every N steps"), "log every N steps (step 0 always)")
    log: frozenset[str] = option(
        str | Iterable[str], DEFAULT_LOG, _log_kinds, "what to capture on logging steps", 'all but `"memory"`'
    )
    include: ModuleFilter = option(
        ModuleFilter,
        None,
        _kept,
        "module-name globs or module types to watch",
        "every module that owns parameters, plus every leaf",
    )
    exclude: ModuleFilter = option(
        ModuleFilter,
        None,
        _kept,
        "module-name globs or module types not to watch",
        "every module that owns parameters, plus every leaf",
    )
    max_modules: int | None = option(
        int | None,
        DEFAULT_MAX_MODULES,
        _max_modules,
        "above this many watched modules, per-module histograms and scalars go to a budget of this many "
        "(include, findings, an even sample; None: every module)",
    )
    optimizer: Any = option(
        torch.optim.Optimizer | None, None, _optimizer, "count one step per optimizer.step(); log update ratios"
    )
    on_nonfinite: str = option(str, "warn", _on_nonfinite, "what a NaN/Inf origin does: warn, raise or ignore")
    check_every: int = option(
        int, 1, _count(0, "0 turns the non-finite check off"), "run the non-finite check every N steps (0: never)"
    )
    check_mode: str = option(str, "replay", _check_mode, "how the non-finite check runs (see CHECK_MODES)")
    thresholds: Thresholds = option(
        Thresholds | Mapping[str, float] | None,
        None,
        _thresholds,
        "when the debugger reports dead units, saturation, vanishing/exploding or stuck gradients",
        "see [Thresholds](debugger.md#thresholds)",
    )
    summary: bool = option(bool, True, _flag, "print the torchinfo summary on the first batch")
    graph: bool = option(bool, True, _flag, "write the graph on the first batch")
    hparams: Mapping[str, Any] | None = option(
        Mapping[str, Any] | None,
        None,
        _hparams,
        "the run's hyperparameters, flattened to TensorBoard's value kinds (records.run_params.check_hparams)",
    )
    step_fn: Callable[[], int] | None = option(
        Callable[[], int] | None, None, _step_fn, "follow an external step counter (a trainer's global_step)"
    )
    image_every: int = option(
        int | None, None, _image_every, "draw feature maps every N steps (step 0 always)", "`10 * every`"
    )
    log_inputs: bool = option(bool, False, _flag, "write the first training batch as an image grid and check it")
    ranks: str = option(str, "zero", _ranks, 'under torch.distributed: "zero" (rank 0 writes) or "all"')
    grad_scaler: Any = option(Any, None, _grad_scaler, "the GradScaler in use: its overflow steps are not NaN origins")
    strict: bool = option(bool, False, _flag, "a failing probe raises ProbeError instead of warning once")
    probes: tuple[Probe, ...] = option(Iterable[Probe] | None, None, _probes, "your own statistics (introspect.Probe)")

    @classmethod
    def validate(cls, model: Any, writer: Any, **given: Any) -> WatchConfig:
        """Every check ``watch`` makes, before it touches the model: ``given`` holds every option
        (``watch`` passes its whole signature), each checked in declaration order."""
        _check_model(model)
        _check_writer(writer)
        checked: dict[str, Any] = {}
        for name, declared in OPTIONS.items():
            checked[name] = declared.check(name, given[name], checked)
        return cls(**checked)


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(WatchConfig)}
"""Every ``watch`` option, by name, in declaration order (``watch()``'s keyword order)."""

WATCH_OPTIONS = frozenset(OPTIONS)
"""The keyword options of :func:`introspect.watch` (the integrations' callbacks accept the same)."""

"""Drop-in callbacks for training frameworks: ``introspect.integrations.lightning`` and
``introspect.integrations.transformers``.

Each framework is an optional extra (``pip install "torch-introspect[lightning]"``,
``"torch-introspect[transformers]"``) and is imported only by its own module, never by
``import introspect``. What the two callbacks share lives here: the extra's import and its error
message, the watch options a callback accepts, and the hyperparameters and final metrics taken
from a framework's own records.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from ..live import WATCH_OPTIONS
from ..records.run_params import check_metrics, plain_scalar

__all__ = ["import_extra", "callback_options", "framework_hparams", "final_metrics"]

# The callback owns these: the writer comes from the trainer, the step from its global_step.
_CALLBACK_OWNED = ("writer", "step_fn")


def import_extra(modules: Iterable[str], extra: str) -> Any:
    """The first of ``modules`` that imports; an ImportError naming the extra's install command."""
    names = list(modules)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        f"introspect.integrations.{extra} needs {' or '.join(names)}, which is not installed: "
        f'pip install "torch-introspect[{extra}]"'
    )


def callback_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check a callback's ``**watch_options`` now, when the callback is made, not at fit time."""
    owned = sorted(set(options) & set(_CALLBACK_OWNED))
    if owned:
        raise ConfigError(
            f"IntrospectCallback sets {owned} itself (the trainer's writer and global_step); leave them out"
        )
    unknown = sorted(set(options) - WATCH_OPTIONS)
    if unknown:
        raise ConfigError(
            f"IntrospectCallback got unknown watch options {unknown}; the options are "
            f"{sorted(WATCH_OPTIONS - set(_CALLBACK_OWNED))}"
        )
    hparams = options.get("hparams")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ConfigError(
            f"hparams must be a dict of name -> value (e.g. {{'lr': 1e-3}}), got {type(hparams).__name__}"
        )
    return dict(options)


def framework_hparams(found: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A framework's hyperparameters, with the user's ``hparams=`` on top. The framework's may hold
    anything (a module passed to ``__init__``): what is not JSON-like becomes its ``str``, where the
    user's own values are checked strictly by ``watch``."""
    merged: dict[str, Any] = {}
    for key, value in found.items():
        value = plain_scalar(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        merged[str(key)] = value
    merged.update(given or {})
    return merged or None


def final_metrics(entries: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """The real-valued entries (the last of each name wins); text and tensors of many values are skipped."""
    numbers: dict[str, Any] = {}
    for key, value in entries:
        value = plain_scalar(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value
    return check_metrics(numbers)

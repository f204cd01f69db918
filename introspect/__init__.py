"""torch-introspect: see inside any PyTorch model while it trains.

>>> from introspect import watch
>>> with watch(model, "runs/exp1") as w:        # doctest: +SKIP
...     train(model)
>>> print(w.report())                           # doctest: +SKIP
"""

from __future__ import annotations

from .diagnostics import Alert, Thresholds
from .errors import (
    AlreadyWatchedError,
    ConfigError,
    IntrospectError,
    IntrospectWarning,
    ModelTypeError,
    NonFiniteError,
    NonFiniteWarning,
    ProbeError,
)
from .summary import summary
from .watch import Watcher, watch

__version__ = "0.1.0"

__all__ = [
    "watch",
    "Watcher",
    "summary",
    "Alert",
    "Thresholds",
    "IntrospectError",
    "ConfigError",
    "ModelTypeError",
    "AlreadyWatchedError",
    "NonFiniteError",
    "IntrospectWarning",
    "NonFiniteWarning",
    "ProbeError",
]

"""torch-introspect: see inside any PyTorch model while it trains.

>>> from introspect import watch
>>> with watch(model, "runs/exp1") as w:        # doctest: +SKIP
...     train(model)
>>> print(w.report())                           # doctest: +SKIP
"""

from __future__ import annotations

from .compare import Divergence, ModuleDiff, first_divergence
from .data import DataReport, inspect_data
from .diagnostics import Alert, Thresholds
from .errors import (
    AlreadyWatchedError,
    ArchitectureError,
    ConfigError,
    ConfigTypeError,
    InputShapeError,
    IntrospectError,
    IntrospectWarning,
    KeyMismatchError,
    LoadError,
    ModelTypeError,
    NonFiniteError,
    NonFiniteWarning,
    ProbeError,
    UnsafeLoadError,
)
from .loading import load_model
from .spectral import SpectralChange, SpectralStats, spectral
from .summary import summary
from .watch import Probe, Watcher, watch

__version__ = "0.1.0"

__all__ = [
    "watch",
    "Watcher",
    "Probe",
    "summary",
    "load_model",
    "inspect_data",
    "DataReport",
    "spectral",
    "SpectralStats",
    "SpectralChange",
    "first_divergence",
    "Divergence",
    "ModuleDiff",
    "Alert",
    "Thresholds",
    "IntrospectError",
    "ConfigError",
    "ConfigTypeError",
    "ModelTypeError",
    "AlreadyWatchedError",
    "NonFiniteError",
    "LoadError",
    "UnsafeLoadError",
    "KeyMismatchError",
    "ArchitectureError",
    "InputShapeError",
    "IntrospectWarning",
    "NonFiniteWarning",
    "ProbeError",
]

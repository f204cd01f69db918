"""torch-introspect: see inside any PyTorch model while it trains.

>>> from introspect import watch
>>> with watch(model, "runs/exp1") as w:        # doctest: +SKIP
...     train(model)
>>> print(w.report())                           # doctest: +SKIP
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .analysis.compare import Divergence, ModuleDiff, first_divergence
from .analysis.data import DataReport, inspect_data
from .analysis.spectral import SpectralChange, SpectralStats, spectral
from .analysis.summary import summary
from .debugger.alerts import Alert
from .debugger.health import Thresholds
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
from .live import Probe, Watcher, watch
from .load.models import load_model

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

"""The package's exceptions: one base class, so ``except IntrospectError`` catches all of ours.

Each also derives from the built-in exception a caller would naturally catch (``TypeError`` for a
wrong kind of argument, ``ValueError`` for a bad value), so generic handlers keep working.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

__all__ = [
    "IntrospectError",
    "ConfigError",
    "ConfigTypeError",
    "ModelTypeError",
    "AlreadyWatchedError",
    "NonFiniteError",
    "ProbeError",
    "LoadError",
    "UnsafeLoadError",
    "KeyMismatchError",
    "ArchitectureError",
    "InputShapeError",
    "IntrospectWarning",
    "NonFiniteWarning",
    "warn",
    "first_line",
]


class IntrospectError(Exception):
    """Base class of every error torch-introspect raises on its own account."""


class ConfigError(IntrospectError, ValueError):
    """An option of ``watch`` (or another entry point) has a value we cannot use."""


class ConfigTypeError(ConfigError, TypeError):
    """An option has the wrong type (``writer=42``, ``log=None``): a ``ConfigError`` that is also a
    ``TypeError``, so either handler catches it."""


class ModelTypeError(IntrospectError, TypeError):
    """An argument is of the wrong kind (e.g. ``watch`` given something that is not an ``nn.Module``)."""


class AlreadyWatchedError(IntrospectError, RuntimeError):
    """A model is already being watched; two watchers would double every hook and every tag."""


class NonFiniteError(IntrospectError, FloatingPointError):
    """Raised by ``watch(..., on_nonfinite="raise")`` when a NaN/Inf first appears.

    ``alert`` holds the finding (module, step, numbers), so a handler can log or inspect it.
    """

    def __init__(self, message: str, alert: object | None = None) -> None:
        super().__init__(message)
        self.alert = alert


class ProbeError(IntrospectError, RuntimeError):
    """Raised by ``watch(..., strict=True)`` when a probe fails on a module (without ``strict``
    the probe warns once, stops, and training goes on). ``module`` is the module's dotted name."""

    def __init__(self, message: str, module: str = "") -> None:
        super().__init__(message)
        self.module = module


class LoadError(IntrospectError, ValueError):
    """A model file cannot be read: missing, corrupt, of no format we know, or its reader is not installed."""


class UnsafeLoadError(LoadError):
    """The file holds pickled Python objects; unpickling them runs arbitrary code, so it needs ``unsafe=True``."""


class KeyMismatchError(LoadError):
    """A state_dict's keys or shapes do not fit the architecture it is loaded into."""


class ArchitectureError(IntrospectError, ValueError):
    """The architecture (``package.module:Class``, ``torchvision:name``) is missing, unknown or cannot be built."""


class InputShapeError(IntrospectError, ValueError):
    """The model rejected an input (usually its shape); the message shows what it expects when we can tell."""


class IntrospectWarning(UserWarning):
    """Something was skipped or degraded (an untraceable graph, a probe that failed on a module);
    training goes on. Filter it with ``warnings.filterwarnings("ignore", category=IntrospectWarning)``."""


class NonFiniteWarning(IntrospectWarning):
    """A NaN/Inf appeared (``on_nonfinite="warn"``, the default); issued once per origin."""


_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.abspath(torch.__file__)),
)


def warn(message: str, category: type[Warning] = IntrospectWarning) -> None:
    """Warn at the user's own line: the first frame outside introspect and torch.

    Our warnings come from hooks and autograd callbacks, deep under ``model(x)`` or
    ``loss.backward()``; a fixed ``stacklevel`` would point into torch, and the once-per-location
    filter would then treat every call site as one.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    filename = frame.f_code.co_filename
    where = dict(
        module=frame.f_globals.get("__name__", "<unknown>"),
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )
    try:
        warnings.warn_explicit(
            message,
            category,
            filename,
            frame.f_lineno,
            **where,
            # Globals let the warnings module fetch a source line through the module's loader; code
            # with no file (``python -c``, "<string>") has none, and asking raises ImportError.
            module_globals=None if filename.startswith("<") else frame.f_globals,
        )
    except ImportError:
        # ``python -m pkg.train``: ``__main__``'s loader is pkg.train's and refuses the name
        # ``__main__`` ("loader for pkg.train cannot handle __main__"): the warning, without the line.
        warnings.warn_explicit(message, category, filename, frame.f_lineno, **where)


def first_line(e: BaseException) -> str:
    """The first non-blank line of an error's message: torch's errors run to paragraphs."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]

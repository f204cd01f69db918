"""The file formats a model is read from, told apart by their bytes: ``torch.save`` archives (through
``weights_only``), TorchScript (its weights read without running its code, unless ``unsafe``),
``torch.export`` programs (checked before torch reads them, their operators before anything runs)
and safetensors; and fitting a state_dict to a model with errors that name the mismatch."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    KeyMismatchError,
    LoadError,
    UnsafeLoadError,
    first_line,
)
from ..terminal import counted
from . import archive, operators, torchscript

__all__ = [
    "ModelFile",
    "read_file",
    "detect_format",
    "find_state_dict",
    "strip_wrapper_prefixes",
    "load_state_dict_into",
    "torch_load",
    "describe_state_dict",
    "FORMATS",
    "STATE_DICT_KEYS",
    "WRAPPER_PREFIXES",
]

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


FORMATS = ("torch", "torchscript", "export", "safetensors")


_SHOWN = 5  # how many names an error message lists


@dataclass
class ModelFile:
    """What a file held: a runnable module (TorchScript, torch.export, a pickled module) or only weights."""

    path: Path
    format: str
    module: nn.Module | None
    state_dict: dict[str, torch.Tensor] | None


def read_file(path: Path, unsafe: bool = False, map_location: str | torch.device = "cpu") -> ModelFile:
    """Read one file (not a folder) in whichever format its bytes say.

    A TorchScript archive is a runnable module only with ``unsafe`` (loading it runs its code);
    without, it is its weights, read as data (:mod:`introspect.load.torchscript`).
    """
    kind = detect_format(path)
    if kind == "torchscript":
        if not unsafe:
            return ModelFile(path, kind, None, torchscript.torchscript_state_dict(path, map_location))
        return ModelFile(path, kind, _load_torchscript(path, map_location), None)
    if kind == "export":
        return ModelFile(path, kind, _load_exported(path, unsafe), None)
    if kind == "safetensors":
        return ModelFile(path, kind, None, _load_safetensors(path, map_location))
    obj = torch_load(path, unsafe, map_location)
    module = _module_in(obj)
    if module is not None:
        return ModelFile(path, "pickled module", module, None)
    return ModelFile(path, kind, None, find_state_dict(obj, source=str(path)))


def detect_format(path: Path) -> str:
    """One of ``FORMATS``, from the file's first bytes and (for zip archives) its member names."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except OSError as e:  # a folder on the way that may not be entered, a path through a file
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise LoadError(f"cannot read {path}: permission denied (a directory)")
        raise LoadError(
            f"{path} is a directory but not a Hugging Face save_pretrained folder (no config.json); "
            "give the model file itself"
        )
    if not stat.S_ISREG(mode):  # opening a pipe would wait for a writer forever
        raise LoadError(f"{path} is not a regular file (a pipe, socket or device); give the model file itself")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0:
        raise LoadError(f"{path} is empty")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                archive.check_zip_sizes(z, path)  # before any reader inflates a member
                names = z.namelist()
                format_files = [n for n in names if n.rsplit("/", 1)[-1] == "archive_format"]
                if format_files and archive.read_member(z, format_files[0], 64, path).strip() == b"pt2":
                    return "export"
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:  # a member name that is not UTF-8
            raise LoadError(f"{path} is a corrupt zip archive: {e}") from e
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("serialized_exported_program.json") for n in names):
            return "export"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise LoadError(
            f"{path} is a zip archive but not one PyTorch writes (no data.pkl, TorchScript code or "
            "torch.export program in it)"
        )
    if head[:4] == b"PK\x03\x04":
        raise LoadError(f"{path} is a truncated or corrupt zip archive (torch.save/TorchScript/.pt2)")
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker: the legacy (pre-1.6) torch.save format
        return "torch"
    raise LoadError(
        f"{path} is not a file we can read: not a torch.save archive, a TorchScript archive, a "
        "torch.export program or a safetensors file"
    )


def find_state_dict(obj: Any, source: str = "the file") -> dict[str, torch.Tensor]:
    """The state_dict in a loaded object: the object itself, or a checkpoint dict's entry under
    one of ``STATE_DICT_KEYS``; wrapper prefixes (``module.``, ``_orig_mod.``) are stripped."""
    if _is_state_dict(obj):
        return strip_wrapper_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return strip_wrapper_prefixes(obj[key])
        keys = [repr(k) for k in list(obj)[: _SHOWN * 2]]
        raise LoadError(
            f"{source} holds a dict with keys [{', '.join(keys)}{', ...' if len(obj) > _SHOWN * 2 else ''}] "
            f"but no state_dict: none of {list(STATE_DICT_KEYS)} maps names to tensors"
        )
    raise LoadError(f"{source} holds a {type(obj).__name__}, not a state_dict, checkpoint dict or model")


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) from every key."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "the file") -> None:
    """``model.load_state_dict(state)``, with a message listing what does not fit when it fails."""
    own = model.state_dict()
    if own and state and not (own.keys() & state.keys()):
        # e.g. a LightningModule's "model." prefix: strip one shared leading component if it then fits
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) == 1 and all("." in k for k in state):
            head = heads.pop() + "."
            stripped = {k[len(head) :]: v for k, v in state.items()}
            if stripped.keys() == own.keys():
                state = stripped
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if shapes:  # torch would stop at the first; say everything that does not fit
        missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    else:
        try:
            result = model.load_state_dict(state, strict=False)  # fills what torch can (old BatchNorm files)
        except RuntimeError as e:
            raise KeyMismatchError(f"the weights in {source} do not fit {type(model).__name__}: {first_line(e)}") from e
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    parts = []
    if missing:
        parts.append(f"{counted(len(missing), 'missing key')} ({_first(missing)})")
    if unexpected:
        parts.append(f"{counted(len(unexpected), 'unexpected key')} ({_first(unexpected)})")
    if shapes:
        parts.append(f"{counted(len(shapes), 'shape mismatch', 'shape mismatches')} ({_first(shapes)})")
    if parts:
        raise KeyMismatchError(f"the weights in {source} do not fit {type(model).__name__}: {'; '.join(parts)}")


# --------------------------------------------------------------------------- formats
def torch_load(path: Path, unsafe: bool, map_location: Any) -> Any:
    """``torch.load`` with ``weights_only=True``; arbitrary objects only with ``unsafe``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        error = archive.read_error(path, e)
        if not (unsafe and isinstance(error, UnsafeLoadError)):
            raise error from (None if isinstance(error, UnsafeLoadError) else e)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise archive.read_error(path, e) from e


def _load_torchscript(path: Path, map_location: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            return torch.jit.load(str(path), map_location=map_location)
    except Exception as e:
        raise archive.read_error(path, e) from e


def _load_exported(path: Path, unsafe: bool) -> nn.Module:
    """A ``torch.export`` program, unflattened back into its named submodules (so hooks see layers).

    ``torch.export.load`` unpickles pickled weights and constants with ``weights_only=False`` and
    falls back to it for sample inputs; every such part is first read here with
    ``weights_only=True`` (the same pickle opcodes, with only torch's allowlist of globals), so a
    part that would run code is refused before torch sees it. The program's operators are then
    checked against an allowlist of side-effect-free ones (:mod:`introspect.load.operators`):
    plain aten nodes can write files when the program runs.
    """
    if not unsafe:
        archive.check_export_archive(path)
    try:
        with warnings.catch_warnings(), _quiet_logger("torch.export"):
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as e:
        raise archive.read_error(path, e) from e
    if not unsafe:  # every node of every graph, before unflatten or any forward
        problem = operators.program_problem(program)
        if problem is not None:
            raise UnsafeLoadError(archive.unsafe_message(path, problem, "running it", operators.RISK))
    try:
        with warnings.catch_warnings(), _quiet_logger("torch.export"):
            warnings.simplefilter("ignore")
            return torch.export.unflatten(program)
    except Exception as e:
        raise archive.read_error(path, e) from e


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a logger for a moment: torch.export.load logs each failed attempt with its
    traceback before it tries the older layout; the error we raise says what went wrong."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise LoadError(
            f"{path} is a safetensors file; reading it needs the safetensors package: pip install safetensors"
        ) from None
    try:
        if torch.device(map_location).type == "meta":  # the header only: names, shapes, dtypes
            state = _safetensors_header(path)
        else:
            state = load_file(str(path), device=str(map_location))
    except Exception as e:
        raise archive.read_error(path, e) from e
    return strip_wrapper_prefixes(state)


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the meta device, from its header alone (safetensors cannot
    map to ``meta`` itself); a dtype this torch lacks reads as bytes of the same shape."""
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(piece.get_dtype(), "uint8"), torch.uint8)
            state[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    return state


# --------------------------------------------------------------------------- helpers
def _module_in(obj: Any) -> nn.Module | None:
    """A pickled module, alone or under a checkpoint key (only ``unsafe=True`` loads can hold one)."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = [v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")]
    return bool(tensors) and not others


def describe_state_dict(state: Mapping[str, Any] | None) -> str:
    names = list(state or {})
    return f"{len(names)} tensors: {_first(names)}"


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")

"""Loading a saved model from disk, safe by default.

>>> model = load_model("ckpt.pt", arch="torchvision:resnet18")           # doctest: +SKIP

A file's format is read from its bytes, not its name: a ``torch.save`` archive (a state_dict, or a
checkpoint dict holding one), a TorchScript archive, a ``torch.export`` program (``.pt2``) or a
safetensors file. A Hugging Face ``save_pretrained`` folder is built from its own config
(:mod:`introspect.load.hf_folder`). Only ``torch.load(weights_only=True)`` ever unpickles, and
``torch.export`` archives are checked before torch reads them (torch unpickles some of their parts
without that guard) and their operators before anything runs:
unpickling arbitrary objects runs whatever code the file's author put in it, so a whole pickled
``nn.Module`` needs ``unsafe=True``. So does running a TorchScript archive (``torch.jit.load`` runs
the TorchScript code inside it); without it, its weights are read as data and go into ``arch``. Everything is mapped to ``map_location`` (the CPU by default),
so a checkpoint saved on a GPU opens on a machine without one.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    ArchitectureError,
    ConfigError,
)
from . import hf_folder, torchscript
from .formats import (
    ModelFile,
    describe_state_dict,
    load_state_dict_into,
    read_file,
)

__all__ = ["load_model", "load_weights", "load_module_or_state_dict", "read_model_file", "build_architecture"]

"""Keys under which checkpoint dicts commonly keep the model's weights, in the order we look."""

"""Key prefixes added by DataParallel/DistributedDataParallel and by ``torch.compile``."""


# --------------------------------------------------------------------------- public
def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    unsafe: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The model saved in ``path``, in eval mode on ``map_location``.

    >>> load_model("weights.pt", arch="examples.models:SeedCNN")                 # doctest: +SKIP
    >>> load_model("ckpt.pt", arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})  # doctest: +SKIP
    >>> load_model("model.pt2")         # a torch.export program                  # doctest: +SKIP
    >>> load_model("model.ts", arch="examples.models:SeedCNN")  # TorchScript's weights, nothing run  # doctest: +SKIP

    Args:
        path: a ``torch.save`` state_dict or checkpoint dict (weights under ``state_dict``,
            ``model_state_dict`` or ``model``; ``module.`` and ``_orig_mod.`` prefixes are
            stripped), a TorchScript archive (its weights, with ``arch``; as the scripted module
            itself only with ``unsafe=True``), a ``torch.export`` program, a safetensors file,
            a Hugging Face ``save_pretrained`` folder (built from its config.json, needs
            ``transformers``), or (with ``unsafe=True``) a pickled ``nn.Module``.
        arch: the architecture weights are loaded into: ``"package.module:Class"`` (a class or a
            factory function, importable from ``sys.path`` or the current directory),
            ``"torchvision:resnet18"`` (built with ``weights=None``) or ``"timm:resnet18"`` (built
            with ``pretrained=False``): nothing is downloaded. Required for bare weights; with a file
            that carries its own model, that model's weights are loaded into ``arch`` instead.
        arch_kwargs: keyword arguments for the architecture (``{"num_classes": 10}``).
        unsafe: allow unpickling arbitrary Python objects and running TorchScript code, and skip
            the checks of ``torch.export`` archives. Only for files you trust: these run any code
            the file's author chose.
        map_location: where tensors go (``"cpu"``, ``"cuda:0"``).

    Raises:
        LoadError: missing, unreadable or corrupt file, or a format whose reader is not installed.
        UnsafeLoadError: the file needs unpickling of arbitrary objects, or running its code (a
            TorchScript archive without ``arch``, a ``.pt2`` calling operators off the allowlist),
            and ``unsafe`` is False.
        ArchitectureError: ``arch`` is needed but missing, unknown, or cannot be built.
        KeyMismatchError: the weights do not fit ``arch`` (missing/unexpected keys, shapes).
    """
    kwargs = _check_kwargs(arch_kwargs)
    loaded = read_model_file(path, unsafe=unsafe, map_location=map_location)
    if arch is None:
        if loaded.module is None and loaded.format == "torchscript":
            raise torchscript.refuse_to_run(loaded.path)
        if loaded.module is None:
            raise ArchitectureError(
                f"{loaded.path} holds only weights ({describe_state_dict(loaded.state_dict)}); say "
                "which model they belong to with arch='package.module:Class' or 'torchvision:resnet18' "
                "(--arch on the command line)"
            )
        model = loaded.module
    else:
        state = loaded.module.state_dict() if loaded.module is not None else loaded.state_dict or {}
        model = build_architecture(arch, kwargs)
        load_state_dict_into(model, state, source=str(loaded.path))
    try:
        model = model.to(map_location)
    except Exception:  # an exported program may pin its devices; it still runs where it was saved
        pass
    return model.eval()


def load_weights(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    unsafe: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Named floating-point weights of a saved model, for statistics and comparisons.

    With a runnable model (or ``arch``) these are its parameters; a bare state_dict needs no
    architecture and gives every floating tensor it holds (BatchNorm running statistics included).
    """
    named: Mapping[str, torch.Tensor]
    if arch is not None:
        model = load_model(path, arch, arch_kwargs, unsafe, map_location)
        named = dict(model.named_parameters())
    else:
        loaded = read_model_file(path, unsafe=unsafe, map_location=map_location)
        named = dict(loaded.module.named_parameters()) if loaded.module is not None else loaded.state_dict or {}
    return {name: t.detach() for name, t in named.items() if t.is_floating_point()}


def load_module_or_state_dict(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    unsafe: bool = False,
) -> nn.Module | dict[str, torch.Tensor]:
    """The model in ``path`` when there is one (with ``arch``, or a file that carries its own), else
    the bare state_dict as it is: a module says which of its tensors are embeddings, a state_dict
    cannot (``introspect weights --spectral`` analyses either)."""
    if arch is not None:
        return load_model(path, arch=arch, arch_kwargs=arch_kwargs, unsafe=unsafe)
    loaded = read_model_file(path, unsafe=unsafe)
    if loaded.module is not None:
        return loaded.module
    assert loaded.state_dict is not None  # a ModelFile holds a module or a state_dict
    return loaded.state_dict


def read_model_file(
    path: str | os.PathLike, unsafe: bool = False, map_location: str | torch.device = "cpu"
) -> ModelFile:
    """Read ``path`` in whichever format its bytes say, without building an architecture (a
    Hugging Face folder carries its own, in its config.json)."""
    path = Path(path)
    if hf_folder.is_hf_folder(path):
        return ModelFile(path, "huggingface", hf_folder.load_hf_folder(path, map_location), None)
    return read_file(path, unsafe, map_location)


def build_architecture(arch: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """An untrained ``nn.Module`` from ``"package.module:Class"``, ``"torchvision:name"`` or
    ``"timm:name"`` (``timm.create_model(name, pretrained=False, **kwargs)``).

    A package that is not importable but sits in the current directory is imported from there, as
    ``python -m`` would: ``--arch examples.models:SeedCNN`` works from the repository root, though
    the ``introspect`` console script does not put the current directory on ``sys.path``.
    """
    kwargs = _check_kwargs(kwargs)
    if not isinstance(arch, str) or arch.count(":") != 1 or not all(arch.split(":")):
        raise ArchitectureError(
            "architecture must look like 'package.module:Class', 'torchvision:resnet18' or "
            f"'timm:resnet18', got {arch!r}"
        )
    module_name, attr = arch.split(":")
    if module_name == "torchvision":
        return _torchvision_model(attr, kwargs)
    if module_name == "timm":
        return _timm_model(attr, kwargs)
    try:
        target: Any = _import_here_too(module_name)
    except ImportError as e:
        raise ArchitectureError(
            f"cannot import {module_name!r} for architecture {arch!r}: {e} (is its directory on PYTHONPATH?)"
        ) from e
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            hint = difflib.get_close_matches(part, names, n=3)
            raise ArchitectureError(
                f"{module_name} has no {attr!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
            )
        target = getattr(target, part)
    if not callable(target):
        raise ArchitectureError(f"{arch} is a {type(target).__name__}, not a class or function that builds a model")
    try:
        model = target(**kwargs)
    except Exception as e:
        raise ArchitectureError(f"building {arch}(**{kwargs}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{arch}(**{kwargs}) returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_here_too(module_name: str) -> Any:
    """``importlib.import_module``, retried with the current directory on ``sys.path`` when the
    top-level package is missing and the current directory holds it. Appended, not prepended:
    nothing installed is shadowed, since the first try found nothing."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        here = os.getcwd()
        if e.name != top or here in sys.path or not (Path(here, top).is_dir() or Path(here, f"{top}.py").is_file()):
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ArchitectureError(f"timm:{name} needs the timm package: pip install timm") from None
    if "pretrained" in kwargs or "pretrained_cfg_overlay" in kwargs:
        raise ArchitectureError(
            "timm architectures are built with pretrained=False: the weights come from the file, and "
            "nothing is downloaded; drop 'pretrained' from the architecture's keyword arguments"
        )
    if not timm.is_model(name):
        hint = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ArchitectureError(f"timm has no model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise ArchitectureError(f"building timm:{name}(**{kwargs}) failed: {type(e).__name__}: {e}") from e


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        hint = difflib.get_close_matches(name, available, n=3)
        raise ArchitectureError(
            f"torchvision has no model {name!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else f"; it has {', '.join(available[:8])}, ...")
        )
    if "weights" in kwargs:
        raise ArchitectureError(
            "torchvision architectures are built with weights=None: the weights come from the file, "
            "and nothing is downloaded; drop 'weights' from the architecture's keyword arguments"
        )
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as e:
        raise ArchitectureError(f"building torchvision:{name}(**{kwargs}) failed: {type(e).__name__}: {e}") from e


def _check_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"arch_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    return dict(kwargs)

"""Which modules and parameters a watcher looks at, and under which names.

Names are the user's own: wrappers (``DataParallel``/``DistributedDataParallel`` via ``.module``,
``torch.compile`` via ``._orig_mod``) are unwrapped first, so tags never start with ``module.`` or
``_orig_mod.``; the wrappers FSDP1 and activation checkpointing put inside a model
(``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``) are dropped from every name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError, ModelTypeError

__all__ = [
    "ModuleFilter",
    "unwrap_model",
    "select_modules",
    "select_parameters",
    "root_name",
    "clean_name",
    "tagged_modules",
]

ModuleFilter = str | type | Sequence[str | type] | None
"""A module-name glob (``"features.*"``), a module type (``nn.Conv2d``), or a sequence of them."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module the user wrote, under ``torch.compile``, (Distributed)DataParallel and FSDP1 wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if type(model).__name__ == "OptimizedModule" and isinstance(
            inner := getattr(model, "_orig_mod", None), nn.Module
        ):
            model = inner
        elif isinstance(inner := getattr(model, "module", None), nn.Module) and (
            isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
            or type(model).__name__ == "FullyShardedDataParallel"  # FSDP1's root wraps the user's model like DDP does
        ):
            model = inner
    return model


WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name parts of wrappers inside a model (FSDP1, ``checkpoint_wrapper``): not the user's names."""


def clean_name(name: str) -> str:
    """``name`` without the wrapper parts: ``block._checkpoint_wrapped_module.fc`` -> ``block.fc``."""
    if "_wrapped_module" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` under clean names; a wrapper shares its name with what it wraps, and
    the wrapped module (the one that computes) keeps it."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        found[clean_name(name)] = module  # the inner module comes after its wrapper: it wins
    return list(found.items())


def root_name(model: nn.Module) -> str:
    """The tag name of the root module (its dotted name is the empty string)."""
    names = {name for name, _ in _named_modules(model)}
    return "model" if "model" not in names else "model(root)"


def tagged_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by its tag name (the root as :func:`root_name`), in
    ``named_modules()`` order: what per-module memory and FLOPs are reported by."""
    top = root_name(model)
    return {name or top: module for name, module in _named_modules(model)}


def _normalise(spec: ModuleFilter, option: str) -> list[str | type]:
    if spec is None:
        return []
    items: list[Any]
    if isinstance(spec, (str, type)):
        items = [spec]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = list(spec)
    else:
        items = [spec]  # reported below with the valid forms
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        raise ConfigError(
            f"{option}= takes module-name globs or nn.Module subclasses, got {item!r} "
            f"(e.g. {option}=['features.*', nn.Conv2d])"
        )
    return items


def _matches(name: str, module: nn.Module, items: Iterable[str | type]) -> bool:
    for item in items:
        if isinstance(item, str):
            if fnmatch.fnmatchcase(name, item):
                return True
        elif isinstance(module, item):
            return True
    return False


def _is_default(module: nn.Module) -> bool:
    """Modules with parameters of their own, and leaves: where the computation happens."""
    has_own_params = next(module.parameters(recurse=False), None) is not None
    is_leaf = next(module.children(), None) is None
    return has_own_params or is_leaf


def select_modules(
    model: nn.Module, include: ModuleFilter = None, exclude: ModuleFilter = None
) -> dict[str, nn.Module]:
    """``{tag name: module}`` in ``named_modules()`` order.

    Without ``include``, every module that owns parameters plus every leaf; with it, exactly the
    modules it matches (containers too), so a user can ask for ``"layer1"``'s block output.
    ``exclude`` then removes modules. The root is matched by the name ``""`` or its tag name.
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"expected an nn.Module, got {type(model).__name__}")
    inc = _normalise(include, "include")
    exc = _normalise(exclude, "exclude")
    top = root_name(model)
    chosen: dict[str, nn.Module] = {}
    for name, module in _named_modules(model):
        tag = name or top
        if inc:
            keep = _matches(name, module, inc) or (not name and _matches(top, module, inc))
        else:
            keep = _is_default(module)
        if keep and exc and (_matches(name, module, exc) or (not name and _matches(top, module, exc))):
            keep = False
        if keep:
            chosen[tag] = module
    if inc and not chosen:
        examples = [n for n, _ in _named_modules(model) if n][:6]
        raise ConfigError(
            f"include={include!r} matches no module of {type(model).__name__}; "
            f"module names look like {examples} (globs use fnmatch: 'features.*')"
        )
    return chosen


def select_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Trainable parameters owned by the selected modules, by their ``named_parameters()`` name."""
    owners = {id(m) for m in modules.values()}
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in _named_modules(model):
        if id(module) not in owners:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                chosen[f"{module_name}.{param_name}" if module_name else param_name] = param
    # Keep named_parameters() order and drop tied duplicates the way it does.
    order = {clean_name(name): i for i, (name, _) in enumerate(model.named_parameters())}
    return {n: chosen[n] for n in sorted(chosen, key=lambda n: order.get(n, len(order))) if n in order}

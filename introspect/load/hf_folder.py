"""A Hugging Face ``save_pretrained`` folder as a model, built from its own config, offline.

>>> model = load_model("checkpoints/gpt2-tiny")        # config.json + model.safetensors  # doctest: +SKIP

A folder is a Hugging Face one when it holds ``config.json`` beside weights. Only ``config.json``
is read for the architecture (tokenizer and generation files are not needed to run layers): the
class named in its ``architectures`` (``GPT2LMHeadModel``) is built from it with random weights by
``transformers`` (nothing is downloaded, no Hub is asked, and a folder that needs its own Python
code, ``auto_map``, is refused: that code would run here). The weights are then read by
:mod:`introspect.load.models`, so the same safety holds: safetensors, or ``pytorch_model.bin`` through
``torch.load(weights_only=True)``; one file, or the shards named by its ``*.index.json``.

``save_pretrained`` stores a tied tensor once (a language model's head shares the embedding
matrix): a key missing from the files that the built model ties to one present is filled from it,
so the tie holds, as ``from_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, first_line
from .formats import load_state_dict_into, read_file

__all__ = ["WEIGHT_FILES", "is_hf_folder", "weight_files", "load_hf_folder"]

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files ``save_pretrained`` writes, in the order they are looked for."""


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a directory with a ``config.json``: what ``save_pretrained`` leaves behind."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def weight_files(folder: Path) -> list[Path]:
    """The files that hold ``folder``'s weights: the first of ``WEIGHT_FILES`` present, or the
    shards its index names (each must be a file inside ``folder``)."""
    for name in WEIGHT_FILES:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        return _shards(folder, candidate)
    present = sorted(p.name for p in folder.iterdir())[:8]
    raise LoadError(
        f"{folder} has a {CONFIG_FILE} but no weights: none of {', '.join(WEIGHT_FILES)} "
        f"(it holds {', '.join(present)})"
    )


def load_hf_folder(folder: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """The model of a ``save_pretrained`` folder, its weights loaded, in eval mode on the CPU
    (``load_model`` moves it to ``map_location``; the tensors are read there)."""
    folder = Path(folder)
    files = weight_files(folder)  # before building: a folder without weights fails fast
    model = _build(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_file(file, map_location=map_location).state_dict or {})
    state = _fit_to(model, state)
    load_state_dict_into(model, state, source=str(folder))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model.eval()


def _build(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise LoadError(
            f"{folder} is a Hugging Face model folder; building it needs the transformers package: "
            "pip install 'torch-introspect[transformers]'"
        ) from None
    try:
        config_data = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read {folder / CONFIG_FILE}: {first_line(e)}") from e
    if not isinstance(config_data, dict):
        raise LoadError(f"{folder / CONFIG_FILE} is not a JSON object")
    if "auto_map" in config_data:
        raise LoadError(
            f"{folder} needs its own Python code to build (auto_map in {CONFIG_FILE}); introspect does "
            "not run code from a model folder. Build the model yourself and pass it to watch()"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise LoadError(f"transformers cannot read {folder / CONFIG_FILE}: {first_line(e)}") from e
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)), None)
    try:
        if cls is None:  # no (known) architecture named: the base model of its model_type
            return transformers.AutoModel.from_config(config)
        return cls(config)
    except Exception as e:
        what = cls.__name__ if cls is not None else f"AutoModel for {config.model_type!r}"
        raise LoadError(
            f"building {what} from {folder / CONFIG_FILE} failed: {type(e).__name__}: {first_line(e)}"
        ) from e


def _shards(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{index} is not a shard index (a JSON object with a weight_map): {first_line(e)}") from e
    shards = []
    for name in names:
        shard = folder / str(name)
        # A shard is named by the index, and the index comes with the download: keep it inside.
        if Path(str(name)).name != name or not shard.is_file():
            raise LoadError(f"{index} names a shard {name!r} that is not a file in {folder}")
        shards.append(shard)
    if not shards:
        raise LoadError(f"{index} names no shards")
    return shards


def _fit_to(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with what ``save_pretrained`` leaves out or adds put right for ``model``: the base
    model's prefix (``transformer.``) added or dropped, keys the class ignores on loading dropped,
    and tied keys filled from the key they are tied to."""
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and own and state and not (own.keys() & state.keys()):
        if all(k.startswith(prefix + ".") for k in own):
            state = {f"{prefix}.{k}": v for k, v in state.items()}
        elif all(k.startswith(prefix + ".") for k in state):
            state = {k[len(prefix) + 1 :]: v for k, v in state.items()}
    ignored_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected")
    state = {k: v for k, v in state.items() if k in own or not any(p.search(k) for p in ignored_unexpected)}
    ignored_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in own.items():
        by_tensor.setdefault(id(tensor), []).append(key)
    for key, tensor in own.items():
        if key in state:
            continue
        twin = next((k for k in by_tensor[id(tensor)] if k in state), None)
        if twin is not None:
            state[key] = state[twin]
        elif any(p.search(key) for p in ignored_missing):
            state[key] = tensor.detach()
    return state


def _patterns(model: nn.Module, attribute: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attribute, None) or [])]

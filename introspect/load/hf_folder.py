"""A Hugging Face ``save_pretrained`` folder as a model, built from its own config, offline and inert.

>>> model = load_model("checkpoints/gpt2-tiny")        # config.json + model.safetensors  # doctest: +SKIP

A folder is a Hugging Face one when it holds ``config.json`` beside weights. Only the config is
read for the architecture (tokenizer and generation files are not needed to run layers): the
class named in its ``architectures`` (``GPT2LMHeadModel``) is built from it with random weights by
``transformers``, and the weights are then read by :mod:`introspect.load.formats`, so the same
safety holds: safetensors, ``pytorch_model.bin`` through ``torch.load(weights_only=True)``, a
TorchScript file as data; one file, or the shards named by its ``*.index.json``.

A config.json is the folder author's input to transformers, and transformers acts on it: it reads
the file ``configuration_files`` points to, fetches a backbone (``"backbone": "<repo>"``) or an
attention kernel (``"attn_implementation": "flash_attention_2"``) from the Hub, and asks on stdin
whether to run the folder's own Python (``auto_map``). So introspect reads the config itself,
bounded (:data:`MAX_CONFIG_BYTES`, :data:`MAX_JSON_DEPTH`), resolves ``configuration_files`` as
transformers would, and refuses ``auto_map`` anywhere in the result, a ``model_type`` transformers
does not ship, and backbones to fetch; keeps only the ``eager`` and ``sdpa`` attentions; and builds
the config from that dict (``from_dict``: no file or Hub lookup) with ``HF_HUB_OFFLINE`` set,
``trust_remote_code=False`` and stdin out of reach, all undone afterwards.

The config also sets the model's size: a 0.8 KB config.json with ``"vocab_size": 60000000`` asks
for gigabytes. So the model is first built on the meta device (no memory behind its tensors, its
module count bounded), its parameters' names and shapes checked against the weight files' headers
(safetensors headers; ``.bin`` storages mapped to the meta device), and its element count against
theirs (:data:`MAX_EXTRA_ELEMENTS`); only then is it built for real.

``save_pretrained`` stores a tied tensor once (a language model's head shares the embedding
matrix): a key missing from the files that the built model ties to one present is filled from it,
so the tie holds, as ``from_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KeyMismatchError, LoadError, first_line
from .formats import load_state_dict_into, read_file

__all__ = [
    "WEIGHT_FILES",
    "MAX_CONFIG_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_EXTRA_ELEMENTS",
    "is_hf_folder",
    "weight_files",
    "read_config",
    "load_hf_folder",
]

CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files ``save_pretrained`` writes, in the order they are looked for."""

MAX_CONFIG_BYTES = 4 * 2**20
"""The largest config.json read: real ones are a few KB (an ImageNet-21k label map, 0.6 MB)."""

MAX_INDEX_BYTES = 32 * 2**20
"""The largest shard index read: the largest mixture-of-experts models' are under 10 MB."""

MAX_JSON_DEPTH = 64
"""How deep a config or index may nest: transformers' own nest a few levels."""

MAX_EXTRA_ELEMENTS = 64 * 2**20
"""How many elements the built model may hold beyond those in its weight files (buffers it
computes when built, keys the class lets go missing): 256 MB as float32."""

_MODULES_PER_TENSOR = 16
_MODULE_ALLOWANCE = 10_000  # modules a meta build may register beyond 16 per tensor in the files
_ATTENTIONS = ("eager", "sdpa")  # attention implementations built into torch: nothing to fetch
_ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a directory with a ``config.json``: what ``save_pretrained`` leaves behind."""
    path = Path(path)
    try:
        return path.is_dir() and (path / CONFIG_FILE).is_file()
    except OSError:  # a directory we may not enter: not one we can read as a model folder
        return False


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
    (``load_model`` moves it to ``map_location``; the tensors are read there).

    Raises:
        LoadError: an unreadable or oversized config or index, one that would run the folder's
            code or fetch from the Hub, or a model transformers cannot build.
        KeyMismatchError: the weight files do not fit the model the config describes (checked
            before the model takes any memory).
    """
    folder = Path(folder)
    files = weight_files(folder)  # before building: a folder without weights fails fast
    transformers = _transformers(folder)
    config_data = read_config(folder)
    headers: dict[str, torch.Tensor] = {}
    for file in files:  # names, shapes and dtypes only: every tensor on the meta device
        headers.update(read_file(file, map_location="meta").state_dict or {})
    with _inert():
        config = _config(config_data, folder)
        with _bounded_modules(_MODULES_PER_TENSOR * len(headers) + _MODULE_ALLOWANCE, folder), torch.device("meta"):
            skeleton = _instantiate(transformers, config, folder)
        _check_fits(skeleton, headers, folder)
        del skeleton
        model = _instantiate(transformers, config, folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_file(file, map_location=map_location).state_dict or {})
    state = _fit_to(model, state)
    load_state_dict_into(model, state, source=str(folder))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model.eval()


# --------------------------------------------------------------------------- the config
def read_config(folder: Path) -> dict[str, Any]:
    """The config transformers would build ``folder``'s model from (config.json, or the file its
    ``configuration_files`` selects for this transformers version), checked to be inert.

    Raises:
        LoadError: a config too large or too deep, one that asks for the folder's own code
            (``auto_map``), a model type transformers does not ship, or a backbone to fetch.
    """
    source = folder / CONFIG_FILE
    data = _json_object(source, MAX_CONFIG_BYTES)
    if "configuration_files" in data:
        chosen = _configuration_file(data["configuration_files"], folder)
        if chosen != CONFIG_FILE:
            source = folder / chosen
            data = _json_object(source, MAX_CONFIG_BYTES)
    for where, node in _dicts(data):
        if "auto_map" in node:
            raise LoadError(
                f"{folder} needs its own Python code to build (auto_map in {source}{where}); introspect does "
                "not run code from a model folder. Build the model yourself and pass it to watch()"
            )
        backbone = node.get("backbone")
        if (isinstance(backbone, str) and backbone) or node.get("use_pretrained_backbone") is True:
            shown = f" {backbone[:80]!r}" if isinstance(backbone, str) else ""
            raise LoadError(
                f"{source}{where} asks for a pretrained backbone{shown}, which transformers would fetch "
                "from the Hub; introspect never downloads. Save the model with its backbone_config instead"
            )
        model_type = node.get("model_type")
        if model_type is not None and (not isinstance(model_type, str) or model_type not in _config_mapping()):
            raise LoadError(
                f"{source}{where} names the model type {str(model_type)[:80]!r}, which transformers does not "
                "ship (a custom model needs its own code, which introspect does not run)"
            )
        for key in _ATTENTION_KEYS:  # any other attention may be a kernel fetched from the Hub
            if key in node and node[key] not in _ATTENTIONS:
                del node[key]
    if not isinstance(data.get("model_type"), str):
        raise LoadError(f"{source} names no model_type, so there is no architecture to build")
    return data


def _configuration_file(files: Any, folder: Path) -> str:
    """The file transformers reads instead of config.json (its own rule, for its own version)."""
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise LoadError(f"{folder / CONFIG_FILE}: configuration_files is not a list of file names")
    try:
        from transformers.configuration_utils import get_configuration_file

        chosen = get_configuration_file(files)
    except Exception as e:  # a version string transformers cannot parse
        raise LoadError(f"{folder / CONFIG_FILE}: configuration_files cannot be resolved: {first_line(e)}") from e
    if Path(chosen).name != chosen or not (folder / chosen).is_file():
        raise LoadError(f"{folder / CONFIG_FILE} points configuration_files at {chosen!r}, not a file in {folder}")
    return chosen


def _json_object(path: Path, limit: int) -> dict[str, Any]:
    """A JSON object from ``path``, read only if it is a regular file of at most ``limit`` bytes
    and nests at most ``MAX_JSON_DEPTH`` levels."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LoadError(f"{path} is not a regular file")
            raw = f.read(limit + 1)
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) > limit:
        raise LoadError(f"refusing {path}: it is larger than the {limit // 2**20} MiB a {path.name} may be")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise LoadError(f"refusing {path}: it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a JSON object")
    for _ in _dicts(data, path):
        pass
    return data


def _dicts(data: Any, path: Path | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict in ``data`` with where it is (`` (at text_config)``), without recursion; with
    ``path``, refuses nesting deeper than ``MAX_JSON_DEPTH``."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while pending:
        node, trail = pending.pop()
        if len(trail) > MAX_JSON_DEPTH:
            raise LoadError(f"refusing {path or 'the config'}: it nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            yield (f" (at {'.'.join(trail)[:120]})" if trail else ""), node
            pending.extend((v, (*trail, str(k))) for k, v in node.items())
        elif isinstance(node, list):
            pending.extend((v, (*trail, str(i))) for i, v in enumerate(node))


def _config(data: dict[str, Any], folder: Path) -> Any:
    mapping = _config_mapping()
    try:
        return mapping[data["model_type"]].from_dict(data)
    except Exception as e:
        raise LoadError(f"transformers cannot read {folder / CONFIG_FILE}: {first_line(e)}") from e


def _config_mapping() -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING


def _transformers(folder: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise LoadError(
            f"{folder} is a Hugging Face model folder; building it needs the transformers package: "
            "pip install 'torch-introspect[transformers]'"
        ) from None
    return transformers


# --------------------------------------------------------------------------- building
def _instantiate(transformers: Any, config: Any, folder: Path) -> nn.Module:
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)), None)
    try:
        if cls is None:  # no (known) architecture named: the base model of its model_type
            return transformers.AutoModel.from_config(config, trust_remote_code=False)
        return cls(config)
    except LoadError:
        raise
    except Exception as e:
        what = cls.__name__ if cls is not None else f"AutoModel for {config.model_type!r}"
        raise LoadError(
            f"building {what} from {folder / CONFIG_FILE} failed: {type(e).__name__}: {first_line(e)}"
        ) from e


class _NoStdin(io.TextIOBase):
    """What ``sys.stdin`` is while transformers builds: a question on it (``Do you wish to run the
    custom code? [y/N]``) gets an error, never a ``y`` piped in."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        raise OSError("introspect does not read stdin while it builds a model")

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        raise OSError("introspect does not read stdin while it builds a model")


@contextlib.contextmanager
def _inert() -> Iterator[None]:
    """Offline (``HF_HUB_OFFLINE``, and huggingface_hub's constant read at each request) and with
    stdin out of reach while transformers builds; all put back afterwards."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    constants: Any = sys.modules.get("huggingface_hub.constants")  # a module whose constant we set
    saved_constant = getattr(constants, "HF_HUB_OFFLINE", None)
    saved_stdin = sys.stdin
    os.environ.update(dict.fromkeys(_OFFLINE_VARIABLES, "1"))
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    sys.stdin = _NoStdin()
    try:
        yield
    finally:
        sys.stdin = saved_stdin
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _bounded_modules(limit: int, folder: Path) -> Iterator[None]:
    """Stop a build (in this thread) that registers more than ``limit`` submodules: on the meta
    device a layer costs no tensor memory, but ``"num_hidden_layers": 10000000`` still builds ten
    million Python modules."""
    thread = threading.get_ident()
    count = 0

    def hook(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        if threading.get_ident() != thread:
            return
        count += 1
        if count > limit:
            raise LoadError(
                f"refusing {folder / CONFIG_FILE}: the model it describes has more than {limit:,} modules, "
                "far more than its weight files could fill"
            )

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_fits(skeleton: nn.Module, headers: dict[str, torch.Tensor], folder: Path) -> None:
    """The model built on the meta device against the weight files' headers: every key and shape
    (the errors ``load_state_dict_into`` gives), and no more elements than the files hold beyond
    ``MAX_EXTRA_ELEMENTS``."""
    load_state_dict_into(skeleton, _fit_to(skeleton, headers), source=str(folder))
    tensors = {id(t): t for t in (*skeleton.parameters(), *skeleton.buffers())}
    wanted = sum(t.numel() for t in tensors.values())
    stored = sum(t.numel() for t in headers.values())
    if wanted > stored + MAX_EXTRA_ELEMENTS:
        raise KeyMismatchError(
            f"the model {folder / CONFIG_FILE} describes holds {wanted:,} values, {wanted - stored:,} more "
            "than its weight files: refused before building it"
        )


def _shards(folder: Path, index: Path) -> list[Path]:
    data = _json_object(index, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index} is not a shard index (a JSON object with a weight_map)")
    names = sorted({str(v) for v in weight_map.values()})
    shards = []
    for name in names:
        shard = folder / name
        # A shard is named by the index, and the index comes with the download: keep it inside.
        if Path(name).name != name or not shard.is_file():
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

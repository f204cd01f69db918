"""Saved models in every format ``introspect.load_model`` reads, and files that must be refused.

Used by test_loading.py and test_cli.py. The seed CNN comes from ``examples.models`` (importable
with the repository root on ``sys.path``, as ``--arch examples.models:SeedCNN`` needs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SEED_ARCH = "examples.models:SeedCNN"
SEED_PARAMS = "54,273"
RESNET_ARCH = "torchvision:resnet18"
RESNET_PARAMS = "11,689,512"

WEIGHT_FORMATS = ("state_dict", "checkpoint", "compiled_checkpoint", "safetensors")
"""Formats that hold only weights: they need an architecture."""
MODEL_FORMATS = ("torchscript", "traced", "export")
"""Formats that carry their own model."""
FORMATS = WEIGHT_FORMATS + MODEL_FORMATS + ("pickled",)
SUFFIX = {"export": ".pt2", "safetensors": ".safetensors"}


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
"""The example input every saved model was exported/traced with."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(files, expected)``: the seed CNN (seed 0) saved in every format, and its output on X."""
    folder = tmp_path_factory.mktemp("saved")
    model = seed_cnn()
    with torch.no_grad():
        expected = model(X)
    return {fmt: save_as(model, fmt, folder, X) for fmt in FORMATS}, expected


def seed_cnn(seed: int = 0) -> nn.Module:
    from examples.models import SeedCNN

    torch.manual_seed(seed)
    return SeedCNN().eval()


def save_as(model: nn.Module, fmt: str, folder: Path, example: torch.Tensor) -> Path:
    """Save ``model`` in format ``fmt`` under ``folder``; returns the file."""
    path = Path(folder) / f"{fmt}{SUFFIX.get(fmt, '.pt')}"
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation warnings
        if fmt == "state_dict":
            torch.save(state, path)
        elif fmt == "checkpoint":  # as a DDP training script saves it
            torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}, path)
        elif fmt == "compiled_checkpoint":  # torch.compile's wrapper prefix
            torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}, "step": 10}, path)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "traced":
            torch.jit.save(torch.jit.trace(model, example), str(path))
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), str(path))
        elif fmt == "pickled":
            torch.save(model, path)
        else:
            raise ValueError(fmt)
    return path


class RunsCode:
    """Unpickling this writes ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def save_code_running_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint whose loading (with weights_only=False) writes ``marker``."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}, path)
    return path


def export_with_code_running_part(exported: Path, path: Path, marker: Path) -> Path:
    """A copy of a torch.export archive whose sample inputs, on loading, write ``marker``.

    torch.export.load falls back to ``torch.load(weights_only=False)`` for sample inputs.
    """
    buffer = path.with_suffix(".evil")
    torch.save((RunsCode(marker),), buffer)
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = buffer.read_bytes() if item.filename.endswith("sample_inputs/model.pt") else src.read(item)
            dst.writestr(item, data)
    buffer.unlink()
    return path


@contextlib.contextmanager
def storages_tagged_cuda() -> Iterator[None]:
    """``torch.save`` inside this block records every CPU tensor as living on ``cuda:0``, as a
    checkpoint saved on a GPU does; loading it without ``map_location`` needs CUDA."""
    from torch import serialization

    def tagger(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    entry = (-1_000_000, tagger, lambda storage, location: None)
    serialization._package_registry.append(entry)
    serialization._package_registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        serialization._package_registry.remove(entry)


def cli_env() -> dict[str, str]:
    """Environment for a subprocess: the repository (this worktree) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "Agg"
    return env


def console_script() -> str:
    """The installed ``introspect`` entry point beside this interpreter."""
    script = Path(sys.executable).parent / "introspect"
    if not script.exists():
        pytest.skip("the introspect console script is not installed beside this interpreter")
    return str(script)


class RefusesTracing(nn.Module):
    """Runs eagerly, but its graph cannot be traced (``--arch saved_models:RefusesTracing``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("no tracing here")
        return self.fc(x)

"""Saved models in every format ``introspect.load_model`` reads, and files that must be refused.

Used by tests/load, tests/cli and the ``saved`` fixture (tests/conftest.py). The seed CNN comes from
``examples.models`` (importable with the repository root on ``sys.path``, as ``--arch
examples.models:SeedCNN`` needs).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.support import REPO_ROOT

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
            torch.save(
                {
                    "epoch": 3,
                    "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                },
                path,
            )
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
    evil = code_running_torch_save(marker)
    return rewrite_zip(exported, path, lambda name, data: evil if name.endswith("sample_inputs/model.pt") else data)


def code_running_torch_save(marker: Path) -> bytes:
    """``torch.save`` bytes whose unpickling (with weights_only=False) writes ``marker``."""
    buffer = io.BytesIO()
    torch.save((RunsCode(marker),), buffer)
    return buffer.getvalue()


def rewrite_zip(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes | None] = lambda name, data: data,
    add: dict[str, bytes] | None = None,
) -> Path:
    """A copy of the zip ``src`` with each member's bytes passed through ``edit`` (None drops the
    member), and the members of ``add`` appended."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item))
            if data is not None:
                zout.writestr(item, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def rewrite_program(exported: Path, path: Path, edit: Callable[[dict], dict]) -> Path:
    """A copy of a torch.export archive whose program JSON (``models/model.json``) is ``edit``ed."""

    def program(name: str, data: bytes) -> bytes:
        return json.dumps(edit(json.loads(data))).encode() if name.endswith("models/model.json") else data

    return rewrite_zip(exported, path, program)


def python_writing(marker: Path) -> str:
    """Python source that writes ``marker``: the payload hostile programs smuggle in."""
    return f"open({str(marker)!r}, 'w').write('ran')"


def quoteless(source: str) -> str:
    """``exec(chr(..)+chr(..)...)``: ``source`` run without a quote or a dot in sight, as sympify
    would run it from a shape expression."""
    return "exec(" + "+".join(f"chr({ord(c)})" for c in source) + ")"


def opaque_constant_export(exported: Path, path: Path, marker: Path) -> Path:
    """The first .pt2 bypass: a constant at ``opaque_obj_0/p`` marked ``use_pickle: false``, which
    torch's ``_load_constants`` hands to ``pickle.loads`` because of its name's prefix."""
    root = _zip_root(exported)
    config_name = f"{root}/data/constants/model_constants_config.json"
    payload = pickle.dumps(RunsCode(marker))

    def constants(name: str, data: bytes) -> bytes:
        if name != config_name:
            return data
        config = json.loads(data)
        config.setdefault("config", {})["evil"] = {
            "path_name": "opaque_obj_0/p",
            "is_param": False,
            "use_pickle": False,
            "tensor_meta": {  # read first as raw uint8 bytes, then unpickled
                "dtype": 1,
                "sizes": [{"as_int": len(payload)}],
                "requires_grad": False,
                "device": {"type": "cpu", "index": None},
                "strides": [{"as_int": 1}],
                "storage_offset": {"as_int": 0},
                "layout": 7,
            },
        }
        return json.dumps(config).encode()

    return rewrite_zip(exported, path, constants, add={f"{root}/data/constants/opaque_obj_0/p": payload})


def flat_layout_export(exported: Path, path: Path, marker: Path) -> Path:
    """The second .pt2 bypass: the older flat layout (``version``, ``serialized_*``) that
    ``torch.export.load`` reads with ``torch.load(weights_only=False)`` as a fallback."""
    from torch._export.serde.schema import SCHEMA_VERSION

    root = _zip_root(exported)
    with zipfile.ZipFile(exported) as z:
        program = z.read(f"{root}/models/model.json")
        sample_inputs = z.read(f"{root}/data/sample_inputs/model.pt")
    empty = io.BytesIO()
    torch.save({}, empty)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", program)
        z.writestr("serialized_state_dict.pt", code_running_torch_save(marker))
        z.writestr("serialized_constants.pt", empty.getvalue())
        z.writestr("serialized_example_inputs.pt", sample_inputs)
    return path


def _zip_root(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/", 1)[0]


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
    """Runs eagerly, but its graph cannot be traced (``--arch tests.support.saved_models:RefusesTracing``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("no tracing here")
        return self.fc(x)


def deflate_bomb(path: Path, inflated: int = 2 * 2**30, member: str = "bomb/archive_format") -> Path:
    """A zip of about ``inflated / 1000`` bytes whose one member inflates to ``inflated`` zero bytes.

    zlib compresses a MiB of zeros into one block; after a full flush that block is the same every
    time, so the stream is built by repetition rather than by compressing gigabytes.
    """
    import struct
    import zlib

    chunk = 2**20
    if inflated % chunk:
        raise ValueError("inflated must be a whole number of MiB")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(chunk)) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(chunk)
    for _ in range(inflated // chunk):
        crc = zlib.crc32(zeros, crc)
    final = b"\x03\x00"  # an empty last block
    compressed = len(block) * (inflated // chunk) + len(final)
    name = member.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, compressed, inflated, len(name), 0) + name
    with open(path, "wb") as f:
        f.write(local)
        for _ in range(inflated // chunk):
            f.write(block)
        f.write(final)
        directory = f.tell()
        central = (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                8,
                0,
                0,
                crc,
                compressed,
                inflated,
                len(name),
                0,
                0,
                0,
                0,
                0,
                0,
            )
            + name
        )
        f.write(central)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), directory, 0))
    return path


_MEASURE = """
import json, resource, subprocess, sys
limit, timeout, code = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

try:
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           preexec_fn=cap)
    result = {"returncode": child.returncode, "stdout": child.stdout, "stderr": child.stderr}
except subprocess.TimeoutExpired as e:
    result = {"returncode": None, "stdout": e.stdout or "", "stderr": e.stderr or ""}
    result = {k: v.decode() if isinstance(v, bytes) else v for k, v in result.items()}
result["peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps(result))
"""


def run_limited(code: str, address_space: int = 6 * 2**30, timeout: float = 120.0) -> dict:
    """Run ``code`` in a fresh Python whose address space is capped (``RLIMIT_AS``) and whose run
    is cut at ``timeout`` seconds; returns its ``returncode`` (None when cut), ``stdout``,
    ``stderr`` and ``peak_rss`` in bytes (``getrusage(RUSAGE_CHILDREN)`` of a parent that ran only it).

    Importing torch maps about 3.5 GB of address space and touches about 0.6 GB, so the default
    cap leaves about 2.5 GB for the work itself.
    """
    import subprocess

    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(address_space), str(timeout), code],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout + 60,
    )
    assert measured.returncode == 0, measured.stderr
    return json.loads(measured.stdout)

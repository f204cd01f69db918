"""Model files from strangers, round 2: without --unsafe nothing is written, run or fetched.

Each hostile case builds its file in ``tmp_path``, shows that its payload does act under
``--unsafe`` or without the defence (plain ``torch.jit.load``, plain ``torch.export.load``, the
transformers calls introspect used to make), and that by default it does not: no marker file
written, no process started, no connection tried, no question asked on stdin. Anything whose memory
the file sets runs in a child process with an address-space limit and a timeout. The fuzz tests
mutate TorchScript code and exported-program graphs (``INTROSPECT_FUZZ_EXAMPLES`` raises their
example count).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from introspect import KeyMismatchError, LoadError, UnsafeLoadError, load_model
from introspect.cli.commands import main
from introspect.load.models import load_weights, read_model_file
from introspect.load.operators import DENIED, allowed_operators, target_problem
from tests.support.saved_models import (
    SEED_ARCH,
    X,
    cli_env,
    rewrite_program,
    rewrite_zip,
    run_limited,
    save_as,
    seed_cnn,
)

EXAMPLES = int(os.environ.get("INTROSPECT_FUZZ_EXAMPLES", "150"))


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def connections(monkeypatch):
    """Every connection (and name lookup) tried, refused before it leaves the machine."""
    tried: list[object] = []

    def refuse(*args, **kwargs):
        tried.append(args[1] if len(args) > 1 else args)
        raise OSError("this test allows no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a))
    return tried


@pytest.fixture
def processes(monkeypatch):
    """Every process started (subprocess, os.system, os.posix_spawn), recorded and not started."""
    started: list[object] = []

    def record(*args, **kwargs):
        started.append(args)
        raise OSError("this test starts no process")

    monkeypatch.setattr(subprocess.Popen, "__init__", record)
    monkeypatch.setattr(os, "system", record)
    monkeypatch.setattr(os, "posix_spawn", record, raising=False)
    return started


@pytest.fixture
def questions(monkeypatch):
    """Every question asked on stdin (``input()``), answered "n"."""
    asked: list[str] = []

    def answer(prompt: str = "") -> str:
        asked.append(prompt)
        return "n"

    monkeypatch.setattr(builtins, "input", answer)
    return asked


# --------------------------------------------------------------------------- TorchScript
WRITES_MARKER = (
    "    _f = torch.from_file({path!r}, True, 3, dtype=0)\n"
    "    _g = torch.copy_(_f, torch.tensor([104, 105, 10], dtype=0))\n"
)
"""TorchScript that opens ``path`` read-write (created if absent), maps it shared, and writes "hi\\n"."""


class RestoresItself(nn.Module):
    """A module with its own ``__getstate__``/``__setstate__``: ``torch.jit.load`` runs the latter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2))
        self.note = "saved"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.note, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.note = state[0]
        self.weight = state[1]
        self.training = state[2]


def edit_code(source: Path, dest: Path, anchor: str, inserted: str) -> Path:
    """A copy of a TorchScript archive with ``inserted`` after the first line ending in ``anchor``
    of the code record holding it (the archive's code is compiled as it is read: no re-signing)."""
    found = []

    def edit(name: str, data: bytes) -> bytes:
        if "/code/" not in name or not name.endswith(".py"):
            return data
        text = data.decode()
        at = text.find(anchor)
        if at < 0 or found:
            return data
        end = text.index("\n", at) + 1
        found.append(name)
        return (text[:end] + inserted + text[end:]).encode()

    rewrite_zip(source, dest, edit)
    assert found, f"no code line ends in {anchor!r}"
    return dest


def torchscript_setstate_payload(folder: Path, marker: Path) -> Path:
    """A TorchScript archive whose ``__setstate__`` (run by ``torch.jit.load``) writes ``marker``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = folder / "restores.pt"
        torch.jit.save(torch.jit.script(RestoresItself()), str(plain))
    use = '    self.note = torch.format("{}", torch.sum(_g))\n'  # a use, so the compiler keeps the write
    return edit_code(
        plain, folder / "restores_evil.pt", "self.note = (state)[0]", WRITES_MARKER.format(path=str(marker)) + use
    )


def torchscript_forward_payload(folder: Path, marker: Path) -> Path:
    """The seed CNN scripted, its ``forward`` (run by ``summary``, ``activations``) writing ``marker``."""
    plain = save_as(seed_cnn(), "torchscript", folder, X)
    use = "    x = torch.add(x, torch.mul(torch.sum(_g), 0))\n"
    return edit_code(
        plain, folder / "forward_evil.pt", "x: Tensor) -> Tensor:", WRITES_MARKER.format(path=str(marker)) + use
    )


def test_torchscript_setstate_payload_runs_under_jit_load_and_never_by_default(tmp_path, processes):
    marker = tmp_path / "marker.txt"
    evil = torchscript_setstate_payload(tmp_path, marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(evil))  # the payload acts on loading alone
    assert marker.read_bytes() == b"hi\n"
    marker.unlink()
    read_model_file(evil, unsafe=True)  # --unsafe is torch.jit.load
    assert marker.exists()
    marker.unlink()

    for attempt in (
        lambda: read_model_file(evil),
        lambda: load_model(evil),
        lambda: load_model(evil, arch="torch.nn:Identity"),
        lambda: load_weights(evil),
    ):
        with pytest.raises(UnsafeLoadError, match=r"restores itself with its own code \(__torch__\..*RestoresItself"):
            attempt()
    line = one_line_error(run("weights", evil), 4)
    assert "--unsafe" in line
    assert not marker.exists() and not processes


def test_torchscript_forward_payload_runs_only_with_unsafe_and_its_weights_load_into_arch(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = torchscript_forward_payload(tmp_path, marker)
    shape = ["--input-shape", "1,3,32,32"]
    line = one_line_error(run("summary", evil, *shape), 4)
    assert "refusing to run" in line and "--arch" in line and "--unsafe" in line
    assert not marker.exists()
    # Its weights, read as data, go into the architecture: nothing of its code runs.
    result = run("summary", evil, *shape, "--arch", SEED_ARCH)
    assert result.exit_code == 0, result.output
    model = load_model(evil, arch=SEED_ARCH)
    assert torch.equal(model.conv1.weight, seed_cnn().conv1.weight)
    assert not marker.exists()
    # With --unsafe the scripted module itself runs, and so does its payload.
    result = run("summary", evil, *shape, "--unsafe")
    assert result.exit_code == 0, result.output
    assert marker.read_bytes() == b"hi\n"


def test_torchscript_weights_read_as_data_match_what_jit_load_gives(tmp_path):
    """The reader without code names and orders tensors as ``torch.jit.load(...).state_dict()``:
    scripted and traced, with BatchNorm buffers, nested containers and a plain tensor attribute."""
    import torchvision

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.BatchNorm1d(2)])
            self.heads = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False)})
            self.register_buffer("scale", torch.full((2,), 3.0))
            self.plain = torch.ones(1)  # an attribute, not a buffer: not in state_dict

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.heads["a"](x) * self.scale + self.plain

    torch.manual_seed(0)
    cases = [(Nested().eval(), torch.randn(4, 2)), (torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))]
    for i, (model, example) in enumerate(cases):
        for how in ("script", "trace"):
            path = tmp_path / f"{i}_{how}.pt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
                torch.jit.save(scripted, str(path))
                expected = torch.jit.load(str(path)).state_dict()
            state = read_model_file(path).state_dict
            assert list(state) == list(expected), how
            assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_an_hf_folder_whose_weights_are_a_torchscript_payload(tmp_path, processes, connections):
    hf_models = pytest.importorskip("hf_models")
    folder = tmp_path / "gpt2"
    hf_models.tiny_gpt2().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker.txt"
    shutil.copy(torchscript_setstate_payload(tmp_path, marker), folder / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(folder / "pytorch_model.bin"))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeLoadError, match="restores itself with its own code"):
        load_model(folder)
    assert not marker.exists() and not processes and not connections


def test_a_torchscript_data_pkl_naming_python_globals_is_refused_without_running(tmp_path):
    plain = save_as(seed_cnn(), "torchscript", tmp_path, X)

    def smuggle(name: str, data: bytes) -> bytes:
        return (
            data.replace(b"c__torch__.examples.models\nSeedCNN\n", b"cos\nsystem\n")
            if name.endswith("data.pkl")
            else data
        )

    evil = rewrite_zip(plain, tmp_path / "globals.pt", smuggle)
    with pytest.raises(UnsafeLoadError, match=r"objects beyond tensors and modules in its data\.pkl \(os\.system\)"):
        read_model_file(evil)


# --------------------------------------------------------------------------- torch.export
class FillsZeros(nn.Module):
    """``zeros(3)``, two bytes of it filled: the shape of the attack when ``zeros`` becomes ``from_file``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(3, dtype=torch.uint8)
        t[0:1].fill_(104)
        t[1:2].fill_(105)
        return x + t.sum()


class Branches(nn.Module):
    """The same inside a ``torch.cond`` branch: a subgraph the program calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def fills(x: torch.Tensor) -> torch.Tensor:
            t = torch.zeros(3, dtype=torch.uint8)
            t[0:1].fill_(104)
            t[1:2].fill_(105)
            return x + t.sum()

        return torch.cond(x.sum() > -1e9, fills, lambda x: x - 1, (x,))


def exported(model: nn.Module, path: Path, example: torch.Tensor | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (torch.zeros(3) if example is None else example,)), str(path))
    return path


def nodes_of(program: dict) -> list[dict]:
    """Every node of every graph in a program's JSON (subgraphs of higher-order ops included)."""
    found, pending = [], [program]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "target" in item and "inputs" in item:
                found.append(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def from_file(marker: Path) -> list[dict]:
    """The inputs of ``aten.from_file.default(filename=marker, shared=True, size=3, dtype=uint8)``."""
    return [
        {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
        {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
        {"name": "size", "arg": {"as_int": 3}, "kind": 1},
        {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
    ]


def zeros_to_from_file(source: Path, dest: Path, marker: Path) -> Path:
    def edit(program: dict) -> dict:
        for node in nodes_of(program):
            if node["target"] == "torch.ops.aten.zeros.default":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = from_file(marker)
        return program

    return rewrite_program(source, dest, edit)


def run_plainly(path: Path, x: torch.Tensor) -> torch.Tensor:
    """What running the file did before the allowlist: torch.export.load, unflatten, forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.unflatten(torch.export.load(str(path)))(x)


@pytest.mark.parametrize("model", [FillsZeros, Branches], ids=["program", "cond-subgraph"])
def test_an_exported_from_file_node_writes_only_with_unsafe(tmp_path, model, processes):
    marker = tmp_path / "marker.txt"
    evil = zeros_to_from_file(exported(model(), tmp_path / "plain.pt2"), tmp_path / "evil.pt2", marker)
    run_plainly(evil, torch.zeros(3))
    assert marker.read_bytes() == b"hi\x00"
    marker.unlink()
    read_model_file(evil, unsafe=True).module(torch.zeros(3))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeLoadError, match=r"the operator aten::from_file\.default"):
        load_model(evil)
    line = one_line_error(run("summary", evil, "--input-shape", "3"), 4)
    assert "aten::from_file" in line and "--unsafe" in line
    assert not marker.exists() and not processes


def test_an_exported_in_place_write_into_the_input_is_refused(tmp_path):
    def add_in_place(program: dict) -> dict:
        last = program["graph_module"]["graph"]["nodes"][-1]
        assert last["target"] == "torch.ops.aten.add.Tensor"
        last["target"] = "torch.ops.aten.add_.Tensor"  # on the allowlist by name: checked per node
        return program

    evil = rewrite_program(exported(FillsZeros(), tmp_path / "plain.pt2"), tmp_path / "evil.pt2", add_in_place)
    x = torch.zeros(3)
    read_model_file(evil, unsafe=True).module(x)
    assert torch.equal(x, torch.full((3,), 209.0))  # the caller's tensor, changed
    with pytest.raises(UnsafeLoadError, match=r"aten::add_\.Tensor writing in place into x, an input"):
        load_model(evil)


@pytest.mark.parametrize(
    "target, reason",
    [
        ("torch.ops.aten.save.default", "aten::save"),
        ("torch.ops.aten._print.default", "aten::_print"),
        ("torch.ops.aten.manual_seed.default", "aten::manual_seed"),
        ("torch.ops.mylib.evil.default", "the custom operator torch.ops.mylib.evil.default"),
        ("#mylib:evil", "the extension operator #mylib:evil"),
        ("torch.ops.higher_order.print", "the higher-order operator torch.ops.higher_order.print"),
        ("torch.save", "the function torch.save"),
        ("torch.jit.load", "the function torch.jit.load"),
    ],
)
def test_exported_targets_off_the_allowlist_are_refused_by_name(tmp_path, target, reason):
    def retarget(program: dict) -> dict:
        program["graph_module"]["graph"]["nodes"][-1]["target"] = target
        return program

    evil = rewrite_program(exported(FillsZeros(), tmp_path / "plain.pt2"), tmp_path / "evil.pt2", retarget)
    with pytest.raises(UnsafeLoadError, match=reason.replace(".", r"\.").replace("(", r"\(")):
        read_model_file(evil)


def test_the_operator_allowlist():
    allowed = allowed_operators()
    for name in ("conv2d.default", "add_.Tensor", "batch_norm.default", "relu_.default", "_assert_scalar.default"):
        assert f"torch.ops.aten.{name}" in allowed, name
    assert "torch.ops.higher_order.cond" in allowed and "_operator.add" in allowed
    for name in DENIED:
        assert not any(a.startswith(f"torch.ops.aten.{name}.") for a in allowed), name
    assert not any("from_file" in a or ".save." in a for a in allowed)
    assert not any(
        a.startswith("torch.ops.") and a.split(".")[2] not in ("aten", "prims", "higher_order") for a in allowed
    )
    assert "strings" in target_problem("torch.ops.aten.upper.default")


# --------------------------------------------------------------------------- Hugging Face folders
@pytest.fixture
def gpt2_folder(tmp_path):
    hf_models = pytest.importorskip("hf_models")
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    hf_models.tiny_gpt2().save_pretrained(folder)
    return folder


def with_config(folder: Path, **changes: object) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.fixture
def online(monkeypatch):
    """As a user's shell is: no offline switch set (so the undefended calls would reach the Hub)."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def build_as_before(folder: Path) -> None:
    """What introspect did before: AutoConfig.from_pretrained(local_files_only=True), then the class."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    getattr(transformers, config.architectures[0])(config)


def test_configuration_files_cannot_smuggle_auto_map_and_stdin_is_never_asked(
    gpt2_folder, tmp_path, online, questions, processes, connections
):
    stdin = sys.stdin
    marker = tmp_path / "ran"
    (gpt2_folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    other = with_config(gpt2_folder)
    other.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig"})
    (gpt2_folder / "config.1.0.json").write_text(json.dumps(other))
    with_config(gpt2_folder, configuration_files=["config.1.0.json"])
    with pytest.raises(ValueError):  # transformers asked (and was told "n"); a "y" would run modeling_evil
        build_as_before(gpt2_folder)
    assert questions and "Do you wish to run the custom code?" in questions[0]
    questions.clear()

    with pytest.raises(LoadError, match=r"auto_map in .*config\.1\.0\.json"):
        load_model(gpt2_folder)
    assert not questions and not marker.exists() and not processes and not connections
    assert sys.stdin is stdin  # out of reach while building, put back after


@pytest.mark.parametrize("attention", ["flash_attention_2", "kernels-community/flash-attn"])
def test_an_attention_kernel_is_never_fetched(gpt2_folder, online, connections, attention):
    with_config(gpt2_folder, attn_implementation=attention)
    with pytest.raises(Exception):  # noqa: B017 (whatever transformers raises once the Hub is out of reach)
        build_as_before(gpt2_folder)
    assert connections, "the undefended build did not try the Hub"
    connections.clear()
    model = load_model(gpt2_folder)
    assert model.config._attn_implementation in ("eager", "sdpa")
    assert not connections


def test_a_backbone_repo_is_refused_before_transformers_sees_it(tmp_path, online, connections):
    pytest.importorskip("transformers")
    folder = tmp_path / "dpt"
    folder.mkdir()
    config = {
        "model_type": "dpt",
        "architectures": ["DPTForDepthEstimation"],
        "backbone": "facebook/dinov2-small",
        "backbone_kwargs": {"out_indices": [1, 2]},
        "use_pretrained_backbone": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(Exception):  # noqa: B017
        build_as_before(folder)
    assert connections, "the undefended build did not try the Hub"
    connections.clear()
    line = one_line_error(run("weights", folder), 3)
    assert "pretrained backbone 'facebook/dinov2-small'" in line and "never downloads" in line
    assert not connections


def test_config_and_index_size_and_depth_are_capped(gpt2_folder):
    config = json.loads((gpt2_folder / "config.json").read_text())
    (gpt2_folder / "config.json").write_text(json.dumps(config)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RecursionError):  # what transformers (and introspect, before) made of it
        json.loads((gpt2_folder / "config.json").read_text())
    line = one_line_error(run("weights", gpt2_folder), 3)
    assert "nests deeper than 64 levels" in line
    (gpt2_folder / "config.json").write_text(json.dumps({**config, "x": json.loads("[" * 500 + "]" * 500)}))
    assert "nests deeper than 64 levels" in one_line_error(run("weights", gpt2_folder), 3)
    (gpt2_folder / "config.json").write_text(json.dumps({**config, "padding": "x" * 5 * 2**20}))
    assert "larger than the 4 MiB a config.json may be" in one_line_error(run("weights", gpt2_folder), 3)
    (gpt2_folder / "config.json").write_text(json.dumps(config))
    (gpt2_folder / "model.safetensors").rename(gpt2_folder / "shard.safetensors")
    index = {"weight_map": {f"k{i}": "shard.safetensors" for i in range(10)}, "pad": "x" * 33 * 2**20}
    (gpt2_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "larger than the 32 MiB" in one_line_error(run("weights", gpt2_folder), 3)


def test_a_custom_model_type_is_refused(gpt2_folder):
    with_config(gpt2_folder, model_type="my_own_gpt")
    assert "does not ship" in one_line_error(run("weights", gpt2_folder), 3)


_BUILD_AND_REPORT = """
from introspect import load_model
try:
    load_model({folder!r})
    print("built")
except Exception as e:
    print("refused:", type(e).__name__, str(e)[:300])
"""


@pytest.mark.slow
def test_a_huge_vocab_size_is_refused_before_it_takes_memory(gpt2_folder):
    """vocab_size 6e7 in a 0.8 KB config.json asked for 7.7 GB (a 6e7 x 32 float32 embedding);
    built on the meta device and checked against the weight file's header, it is refused at the
    cost of importing transformers."""
    with_config(gpt2_folder, vocab_size=60_000_000)
    size = len((gpt2_folder / "config.json").read_bytes())
    assert size < 1200
    result = run_limited(_BUILD_AND_REPORT.format(folder=str(gpt2_folder)), address_space=8 * 2**30, timeout=300)
    assert result["returncode"] == 0, result["stderr"][-2000:]
    assert "refused: KeyMismatchError" in result["stdout"], result["stdout"]
    assert "transformer.wte.weight: file [100, 32] vs model [60000000, 32]" in result["stdout"]
    assert result["peak_rss"] < 1.5e9, result["peak_rss"]


@pytest.mark.slow
def test_millions_of_layers_are_refused_while_the_skeleton_is_built(gpt2_folder):
    with_config(gpt2_folder, n_layer=10_000_000)
    result = run_limited(_BUILD_AND_REPORT.format(folder=str(gpt2_folder)), address_space=8 * 2**30, timeout=300)
    assert result["returncode"] == 0, result["stderr"][-2000:]
    assert "refused: LoadError" in result["stdout"] and "more than" in result["stdout"], result["stdout"]
    assert result["peak_rss"] < 1.5e9, result["peak_rss"]


def test_a_skeleton_with_more_values_than_its_files_is_refused(tmp_path):
    """A buffer the model computes when built is in no weight file: its size shows only in the count."""
    from introspect.load import hf_folder

    with torch.device("meta"):
        skeleton = nn.Linear(2, 2)
        skeleton.register_buffer("mask", torch.zeros(2**27), persistent=False)
    headers = {k: torch.empty_like(v) for k, v in skeleton.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="holds 134,217,734 values, 134,217,728 more than its weight files"):
        hf_folder._check_fits(skeleton, headers, tmp_path)


# --------------------------------------------------------------------------- errors
def test_deeply_nested_arch_kwargs_is_a_usage_error(tmp_path):
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    with pytest.raises(RecursionError):  # what the option's parser met before
        json.loads(deep)
    for kwargs in (deep, '{"a":' * 40 + "1" + "}" * 40):
        result = run("summary", tmp_path / "x.pt", "--input-shape", "1,3", "--arch-kwargs", kwargs)
        assert result.exit_code == 2 and "nested deeper than 32 levels" in result.stderr
        assert "Traceback" not in result.output


def _as_unprivileged(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m introspect ...`` as a user the file's permissions apply to: root without the
    capabilities that override them (setpriv), or this user when it is not root."""
    command = [sys.executable, "-m", "introspect", *map(str, args)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root reads any file, and setpriv is not here to drop that")
        drop = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=300)


@pytest.mark.slow
def test_an_unreadable_model_is_one_line_and_exit_3(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    folder = tmp_path / "closed"
    folder.mkdir()
    try:
        path.chmod(0)
        folder.chmod(0)
        for target, message in ((path, "cannot read"), (folder, "cannot read")):
            result = _as_unprivileged("weights", target, cwd=tmp_path)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 3, result.stderr
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    finally:
        path.chmod(0o644)
        folder.chmod(0o755)


def test_fp8_weights_are_summarised(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    w = torch.randn(4, 4).to(torch.float8_e4m3fn)
    v = torch.randn(3).to(torch.float8_e5m2)
    save_file({"w": w, "v": v}, str(tmp_path / "fp8.safetensors"))
    torch.save({"w": w}, tmp_path / "fp8.pt")
    with pytest.raises(NotImplementedError):  # why `weights` failed before
        torch.isfinite(w)
    result = run("weights", tmp_path / "fp8.safetensors", "--logdir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("w "))
    assert f"{float(w.float().mean()):.4g}"[:5] in row
    result = run("weights", tmp_path / "fp8.pt", tmp_path / "fp8.safetensors")
    assert result.exit_code == 0 and "0 changed" in result.stdout, result.output


# --------------------------------------------------------------------------- fuzzing
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = Path(__import__("tempfile").mkdtemp(prefix="introspect-untrusted-"))
__import__("atexit").register(shutil.rmtree, _FUZZ, True)
MARKER = _FUZZ / "marker.txt"

TARGETS = sorted(
    {
        "torch.ops.aten.from_file.default",
        "torch.ops.aten.save.default",
        "torch.ops.aten._print.default",
        "torch.ops.aten.warn.default",
        "torch.ops.aten.manual_seed.default",
        "torch.ops.aten.set_.source_Tensor",
        "torch.ops.aten.resize_.default",
        "torch.ops.aten.copy_.default",
        "torch.ops.aten.fill_.Scalar",
        "torch.ops.aten.add_.Tensor",
        "torch.ops.aten.mul_.Tensor",
        "torch.ops.aten.zero_.default",
        "torch.ops.aten.relu_.default",
        "torch.ops.aten.add.Tensor",
        "torch.ops.aten.mul.Tensor",
        "torch.ops.aten.sum.default",
        "torch.ops.aten.slice.Tensor",
        "torch.ops.aten.view.default",
        "torch.ops.aten.zeros.default",
        "torch.ops.aten.batch_norm.default",
        "torch.ops.prims.add.default",
        "torch.ops.mylib.evil.default",
        "torch.ops.higher_order.print",
        "torch.ops.higher_order.with_effects",
        "torch.save",
        "torch.load",
        "torch.jit.load",
        "_operator.getitem",
        "_operator.methodcaller",
        "builtins.exec",
        "#mylib:evil",
    }
)


def _fuzz_seeds() -> dict[str, bytes]:
    return {
        name: exported(model(), _FUZZ / f"{name}.pt2", example).read_bytes()
        for name, model, example in (
            ("fills", FillsZeros, None),
            ("cond", Branches, None),
            ("cnn", seed_cnn, X),
        )
    }


_SEEDS: dict[str, bytes] = {}

graph_mutation = st.one_of(
    st.tuples(st.just("retarget"), st.integers(0, 10**6), st.sampled_from(TARGETS)),
    st.tuples(st.just("from_file"), st.integers(0, 10**6)),
    st.tuples(st.just("in_place"), st.integers(0, 10**6)),
    st.tuples(st.just("to_input"), st.integers(0, 10**6), st.integers(0, 10**6)),
)


def _mutate_program(data: bytes, steps: list[tuple]) -> bytes:
    source, dest = _FUZZ / "source.pt2", _FUZZ / "mutated.pt2"
    source.write_bytes(data)

    def edit(program: dict) -> dict:
        nodes = nodes_of(program)
        inputs = [
            spec[kind]["arg"]["name"] if "name" in spec[kind]["arg"] else spec[kind]["arg"]["as_tensor"]["name"]
            for spec in program["graph_module"]["signature"]["input_specs"]
            for kind in spec
        ]
        for kind, where, *rest in steps:
            node = nodes[where % len(nodes)]
            if kind == "retarget":
                node["target"] = rest[0]
            elif kind == "from_file":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = from_file(MARKER)
            elif kind == "in_place":
                name, _, overload = node["target"].rpartition(".")
                if name.startswith("torch.ops.aten.") and not name.endswith("_"):
                    node["target"] = f"{name}_.{overload}"
            else:
                tensors = [i for i in node["inputs"] if "as_tensor" in i["arg"]]
                if tensors:
                    tensors[rest[0] % len(tensors)]["arg"]["as_tensor"]["name"] = inputs[where % len(inputs)]
        return program

    rewrite_program(source, dest, edit)
    return dest.read_bytes()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.sampled_from(["fills", "cond", "cnn"]), steps=st.lists(graph_mutation, min_size=1, max_size=3))
def test_mutated_exported_graphs_never_write_and_never_touch_their_inputs(seed, steps):
    """A program with its operators mutated either is refused (a LoadError) or, loaded, runs without
    writing a file and without changing its input or its parameters."""
    if not _SEEDS:
        _SEEDS.update(_fuzz_seeds())
    path = _FUZZ / "case.pt2"
    path.write_bytes(_mutate_program(_SEEDS[seed], steps))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = read_model_file(path).module
            example = X.clone() if seed == "cnn" else torch.zeros(3)
            before, params = example.clone(), _snapshot(module)
            try:
                module(example)
                event("loaded, ran")
            except Exception:
                event("loaded, did not run")  # a mutated graph may not run; it must not write
            assert torch.equal(example, before), f"the input changed: {steps}"
            after = _snapshot(module)
            assert all(torch.equal(params[k], after[k]) for k in params if k in after), f"a parameter changed: {steps}"
    except LoadError as e:
        event(f"refused: {type(e).__name__}")
    finally:
        ran = MARKER.exists()
        MARKER.unlink(missing_ok=True)
    assert not ran, f"the payload ran: {seed} after {steps}"


TS_STATEMENTS = [
    WRITES_MARKER.format(path=str(MARKER)) + "    _h = torch.sum(_g)\n",
    '    print("loaded")\n',
    "    _z = torch.zeros([3])\n",
    f"    _z = torch.from_file({str(MARKER)!r}, True, 3)\n",
]
TS_CLASS_LINES = [
    '  __parameters__ = ["weight", "nothing", ]\n',
    "  __parameters__ = []\n",
    '  __buffers__ = ["bias", ]\n',
    "  def __setstate__(self: Any, state: Tuple[Tensor]) -> NoneType:\n"
    + WRITES_MARKER.format(path=str(MARKER))
    + "    return None\n",
]
ts_mutation = st.one_of(
    st.tuples(st.just("statement"), st.integers(0, 10**6), st.sampled_from(TS_STATEMENTS)),
    st.tuples(st.just("class_line"), st.integers(0, 10**6), st.sampled_from(TS_CLASS_LINES)),
    st.tuples(
        st.just("global"),
        st.integers(0, 10**6),
        st.sampled_from(
            ["os\nsystem", "builtins\nexec", "torch\nfrom_file", "__torch__\nEvil", "collections\nOrderedDict"]
        ),
    ),
    st.tuples(st.just("drop_code"), st.integers(0, 10**6)),
)


def _mutate_torchscript(data: bytes, steps: list[tuple]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    for kind, where, *rest in steps:
        code = [i for i, (n, _) in enumerate(members) if "/code/" in n and n.endswith(".py")]
        if kind in ("statement", "class_line") and code:
            i = code[where % len(code)]
            lines = members[i][1].decode().splitlines(keepends=True)
            spots = [
                j
                for j, line in enumerate(lines)
                if (line.startswith("  def ") if kind == "statement" else line.startswith("class "))
            ]
            if spots:
                j = spots[where % len(spots)]
                while kind == "statement" and not lines[j].rstrip().endswith(":"):
                    j += 1  # past a signature over several lines
                lines.insert(j + 1, rest[0])
                members[i] = (members[i][0], "".join(lines).encode())
        elif kind == "global":
            i = next(i for i, (n, _) in enumerate(members) if n.endswith("data.pkl"))
            body = members[i][1]
            starts = [k for k in range(len(body)) if body[k : k + 1] == b"c" and b"\n" in body[k + 1 : k + 80]]
            if starts:
                k = starts[where % len(starts)]
                end = body.index(b"\n", body.index(b"\n", k + 1) + 1) + 1
                members[i] = (members[i][0], body[:k] + b"c" + rest[0].encode() + b"\n" + body[end:])
        elif kind == "drop_code" and code:
            del members[code[where % len(code)]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, body in members:
            z.writestr(name, body)
    return buffer.getvalue()


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=st.lists(ts_mutation, min_size=1, max_size=3))
def test_mutated_torchscript_is_never_compiled_or_run(steps):
    """Whatever the archive's code or data.pkl say, reading it without --unsafe never calls
    torch.jit.load (so compiles and runs nothing): weights, or a LoadError."""
    if "torchscript" not in _SEEDS:
        _SEEDS["torchscript"] = save_as(seed_cnn(), "torchscript", _FUZZ, X).read_bytes()
    path = _FUZZ / "case.pt"
    path.write_bytes(_mutate_torchscript(_SEEDS["torchscript"], steps))
    calls = []
    real = torch.jit.load
    torch.jit.load = lambda *a, **k: calls.append(a)  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for how, attempt in (
                ("read", lambda: read_model_file(path)),
                ("arch", lambda: load_model(path, arch=SEED_ARCH)),
            ):
                try:
                    attempt()
                    event(f"{how}: weights")
                except LoadError as e:
                    event(f"{how}: {type(e).__name__}")
    finally:
        torch.jit.load = real
        ran = MARKER.exists()
        MARKER.unlink(missing_ok=True)
    assert not calls and not ran, f"ran: {steps}"


def test_the_torchscript_fuzzer_can_build_archives_that_write():
    """The property can fail: a statement the fuzzer inserts writes the marker under torch.jit.load."""
    data = save_as(seed_cnn(), "torchscript", _FUZZ, X).read_bytes()
    statement = WRITES_MARKER.format(path=str(MARKER)) + "    x = torch.add(x, torch.mul(torch.sum(_g), 0))\n"
    path = _FUZZ / "writes.pt"
    path.write_bytes(_mutate_torchscript(data, [("statement", 0, statement)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_model_file(path, unsafe=True).module(X)
    assert MARKER.exists()
    MARKER.unlink()

"""Hostile archives: no code of a .pt2's author runs without unsafe=True, and no read is unbounded.

Each hostile file is built from a real ``torch.export`` archive and carries a payload that only
writes a marker file in tmp_path. Where a test shows a refusal, it also shows that the very same
file does run its payload under ``unsafe=True`` (plain ``torch.export.load``): the test can fail.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from introspect import LoadError, UnsafeLoadError, load_model
from introspect.load.archive import (
    MAX_INFLATION,
    check_export_archive,
    check_program,
    check_sym_expr,
)
from tests.support.saved_models import (
    X,
    deflate_bomb,
    export_with_code_running_part,
    flat_layout_export,
    opaque_constant_export,
    python_writing,
    quoteless,
    rewrite_program,
    rewrite_zip,
    run_limited,
    save_as,
    seed_cnn,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return save_as(seed_cnn(), "export", tmp_path_factory.mktemp("export"), X)


def _first_size_symbolic(marker: Path):
    """Edit: the first tensor's first size becomes a shape expression that runs Python in sympify."""

    def edit(program: dict) -> dict:
        values = program["graph_module"]["graph"]["tensor_values"]
        sizes = next(iter(values.values()))["sizes"]
        sizes[0] = {"as_expr": {"expr_str": quoteless(python_writing(marker)), "hint": {"as_int": sizes[0]["as_int"]}}}
        return program

    return edit


def _renamed(old: str, new: str):
    """Edit: every string ``old`` in the program becomes ``new`` (an input's name, everywhere)."""

    def rename(node):
        if isinstance(node, dict):
            return {rename(k): rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return new if node == old else node

    return rename


HOSTILE = {
    # the two bypasses of the issue, built as it describes them
    "opaque constant in a subfolder": lambda src, dst, marker: opaque_constant_export(src, dst, marker),
    "older flat layout": lambda src, dst, marker: flat_layout_export(src, dst, marker),
    # and what the allowlist also stops
    "pickled sample inputs": lambda src, dst, marker: export_with_code_running_part(src, dst, marker),
    "shape expression run by sympify": lambda src, dst, marker: rewrite_program(src, dst, _first_size_symbolic(marker)),
    "input name compiled by torch.fx": lambda src, dst, marker: rewrite_program(
        src, dst, _renamed("x", "x=" + python_writing(marker))
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_export_is_refused_and_its_code_never_runs(exported, tmp_path, kind):
    marker = tmp_path / "marker.txt"
    path = HOSTILE[kind](exported, tmp_path / "hostile.pt2", marker)
    with pytest.raises(UnsafeLoadError, match="arbitrary code") as refused:
        load_model(path)
    assert "--unsafe" in str(refused.value) and "weights_only=False" not in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not marker.exists()
    try:  # torch.export.load itself runs it
        load_model(path, unsafe=True)
    except LoadError:
        pass
    assert marker.exists(), "the hostile file did not run its payload even unchecked"


def test_real_exports_pass_the_check(tmp_path):
    """torchvision's resnet18 (reused ReLUs: "relu@1" in its module stacks) and a model with
    torch.cond and a constant tensor load as before."""
    import torchvision

    class Branches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3)})
            self.register_buffer("scale", torch.ones(3))
            self.offset = torch.tensor([1.0, 2.0, 3.0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.layers["a"](x)
            return torch.cond(y.sum() > 0, lambda a: a + self.offset, lambda a: a - 1, (y,)) * self.scale

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    for model, example in ((resnet, torch.randn(1, 3, 64, 64)), (Branches().eval(), torch.randn(2, 3))):
        path = tmp_path / f"{type(model).__name__}.pt2"
        torch.export.save(torch.export.export(model, (example,)), str(path))
        check_export_archive(path)
        with torch.no_grad():
            assert torch.allclose(load_model(path)(example), model(example), atol=1e-5)


@pytest.mark.slow
def test_a_transformer_with_dynamic_shapes_passes_the_check(tmp_path):
    """A BERT from a config (random weights): its program holds shape expressions (srepr)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    batch, length = torch.export.Dim("batch", max=64), torch.export.Dim("length", max=64)
    program = torch.export.export(model, (ids,), dynamic_shapes={"input_ids": {0: batch, 1: length}}, strict=False)
    path = tmp_path / "bert.pt2"
    torch.export.save(program, str(path))
    with zipfile.ZipFile(path) as z:
        assert "Symbol(" in z.read("bert/models/model.json").decode()
    check_export_archive(path)
    loaded = load_model(path)
    with torch.no_grad():
        other = torch.randint(0, 100, (3, 5))  # another batch and length: the shapes are symbolic
        assert torch.allclose(loaded(other)[0], model(other)[0], atol=1e-5)


# --------------------------------------------------------------------------- layouts and members
def _root(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/", 1)[0]


def test_members_torch_would_run_as_code_are_refused(exported, tmp_path):
    root = _root(exported)
    aoti = rewrite_zip(exported, tmp_path / "aoti.pt2", add={f"{root}/data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafeLoadError, match="compiled code"):
        load_model(aoti)
    guarded = rewrite_program(
        exported, tmp_path / "guards.pt2", lambda p: {**p, "guards_code": ["L['x'].size()[0] == 1"]}
    )
    with pytest.raises(UnsafeLoadError, match="guards as Python source"):
        load_model(guarded)
    custom = rewrite_zip(exported, tmp_path / "custom.pt2", add={f"{root}/data/constants/custom_obj_0": b"x"})
    with pytest.raises(UnsafeLoadError, match="pickled Python object"):
        load_model(custom)


def test_unknown_and_ambiguous_layouts_are_refused(exported, tmp_path):
    root = _root(exported)
    unknown = rewrite_zip(exported, tmp_path / "unknown.pt2", add={f"{root}/data/plugins/x.bin": b"x"})
    with pytest.raises(LoadError, match="no part of a torch.export archive we know"):
        load_model(unknown)
    # torch looks names up ignoring case, Python's zipfile does not: one copy checked, another read
    folded = rewrite_zip(exported, tmp_path / "folded.pt2", add={f"{root}/data/sample_inputs/MODEL.pt": b"x"})
    with pytest.raises(LoadError, match="but for case"):
        load_model(folded)
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = rewrite_zip(exported, tmp_path / "twice.pt2", add={f"{root}/models/model.json": b"{}"})
    with pytest.raises(LoadError, match="more than once"):
        load_model(twice)
    escaped = rewrite_zip(
        exported,
        tmp_path / "escaped.pt2",
        edit=lambda name, data: (
            data.replace(b'"weight_0"', b'"tensor_0"') if name.endswith("weights_config.json") else data
        ),
    )
    with pytest.raises(LoadError, match="not a weights file of this archive"):
        load_model(escaped)
    version = rewrite_zip(
        exported, tmp_path / "v1.pt2", edit=lambda name, data: b"1" if name.endswith("/archive_version") else data
    )
    with pytest.raises(LoadError, match="layout we know"):
        load_model(version)


def test_a_flat_layout_mixed_with_the_current_one_is_refused(exported, tmp_path):
    mixed = rewrite_zip(exported, tmp_path / "mixed.pt2", add={"version": b"8.20"})
    with pytest.raises(LoadError, match="mixes the current torch.export layout"):
        check_export_archive(mixed)


def test_a_clean_flat_layout_passes(exported, tmp_path):
    """The older layout is read (not refused wholesale) when every part is clean."""
    path = flat_layout_export(exported, tmp_path / "flat.pt2", tmp_path / "unused.txt")
    clean = rewrite_zip(
        path,
        tmp_path / "clean.pt2",
        edit=lambda name, data: _torch_save_bytes({}) if name == "serialized_state_dict.pt" else data,
    )
    check_export_archive(clean)


def _torch_save_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the program's strings
TORCH_EXPRESSIONS = [
    "Symbol('s77', positive=True, integer=True)",
    "Mul(Integer(2), Symbol('s77', positive=True, integer=True))",
    "FloorDiv(Symbol('s77', positive=True, integer=True), Integer(3))",
    "Pow(Symbol('s0', positive=True, integer=True), Integer(2))",
    "Float('1.5', precision=53)",
    "2*s0 + 1",
    "FloorDiv(s0, 2)",
    "Max(1, s0*s1)",
    "s0**2",
    "-s0 + 3 <= 7",
    "Eq(Mod(s0, 8), 0)",
]
HOSTILE_EXPRESSIONS = {
    "exec(chr(105)+chr(109))": "the name 'exec'",
    "__import__('os')": "the name '__import__'",
    "s0.__class__": "'.'",
    "Symbol('s0').subs": "'.'",
    "(s0, s1)*9999999999": "a tuple",
    "Integer('1')*Symbol('x'*99)": "the string",
    "Pow(Integer(2), Integer(10000000000))": "a power",
    "2**99999999999": "a power",
    "PowByNatural(Integer(2), Add(Integer(10**18), Integer(1)))": "a power",
    "Pow(Pow(Pow(Pow(s0, 2), 2), 2), 2)": "a power",
    "factorial2(99999999)": "the name 'factorial2'",
    "lambda: 1": "the name 'lambda'",
    "s0[0]": "'['",
    "s0 # comment": "'# comment'",
    "99999999999999999999999": "the number",
    "s0+" * 4000: "longer than",
}


@pytest.mark.parametrize("text", TORCH_EXPRESSIONS)
def test_shape_expressions_torch_writes_pass(text):
    assert check_sym_expr(text) is None


@pytest.mark.parametrize("text", list(HOSTILE_EXPRESSIONS))
def test_shape_expressions_that_could_run_code_or_fill_memory_are_refused(text):
    problem = check_sym_expr(text)
    assert problem is not None and HOSTILE_EXPRESSIONS[text] in problem, problem


@pytest.mark.parametrize(
    "key, text",
    [
        ("stack_trace", 'File "a.py", line 1, in f\n    y = x\rimport os'),  # \r ends the comment it becomes
        (
            "in_spec",
            json.dumps(
                [
                    1,
                    {
                        "type": "builtins.dict",
                        "context": json.dumps(["a'] + os.system('x') + ['"]),
                        "children_spec": [],
                    },
                ]
            ),
        ),
        ("target", 'torch.ops.aten.add.Tensor")'),
        ("nn_module_stack", 'L__self__,x"),os.system(1)#,torch.nn.Linear'),
        ("parameter_name", 'w") or open("m", "w") or ("'),
        ("<key>", "a=b"),
    ],
)
def test_program_strings_that_would_become_source_are_refused(tmp_path, key, text):
    program = {key: text} if key != "<key>" else {text: 1}
    with pytest.raises(UnsafeLoadError, match="would turn into code"):
        check_program(program, "models/model.json", tmp_path / "m.pt2")


def test_free_text_and_plain_names_pass(tmp_path):
    check_program(
        {
            "stack_trace": 'File "a.py", line 3, in forward\n    return F.linear(x, self.w)',
            "as_string": "bij,bjk->bik",  # an einsum equation: repr()'d into the source
            "nn_module_stack": "L__self__,,m.Net;L__self__relu@1,relu,torch.nn.ReLU",
            "parameter_name": "features.0.weight",
            "torch_version": "2.14.1+cu130",
            "in_spec": '[1, {"type": "builtins.dict", "context": "[\\"input_ids\\"]", "children_spec": []}]',
        },
        "models/model.json",
        tmp_path / "m.pt2",
    )


# --------------------------------------------------------------------------- bounded reads
def test_an_archive_that_inflates_far_beyond_its_size_is_refused_before_any_read(tmp_path):
    bomb = deflate_bomb(tmp_path / "bomb.pt", inflated=MAX_INFLATION + 2**20)
    with pytest.raises(LoadError, match="zip bomb"):
        load_model(bomb)


@pytest.mark.slow
def test_deflate_bomb_fails_within_1_gb_of_peak_rss(tmp_path):
    """The issue's file: 2 MB whose ``archive_format`` inflates to 2 GiB (peak RSS was 4.6 GB)."""
    bomb = deflate_bomb(tmp_path / "bomb.pt", inflated=2 * 2**30)
    assert bomb.stat().st_size < 3 * 2**20
    code = (
        "from introspect import load_model, LoadError\n"
        f"try:\n    load_model({str(bomb)!r})\nexcept LoadError as e:\n    print('refused:', e)\n"
    )
    result = run_limited(code, timeout=120)
    assert result["returncode"] == 0, result["stderr"]
    assert "refused:" in result["stdout"] and "zip bomb" in result["stdout"]
    assert result["peak_rss"] < 2**30, f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "flagged, old, new",
    [
        (True, b"/byteorder", b"/byteorde\x80"),
        (False, b"/byteorder", b"/byteorde\x80"),
    ],
    ids=["utf8-flag", "cp437"],
)
def test_a_member_name_that_is_not_utf8_is_a_load_error(exported, tmp_path, flagged, old, new):
    """Found by the fuzz test. With the UTF-8 flag set Python's zipfile fails on such a name;
    without it Python reads it as cp437 and torch's reader raises UnicodeDecodeError."""
    source = exported
    if not flagged:  # fresh ZipInfos: ASCII names are written without the flag
        source = tmp_path / "plain.pt2"
        with zipfile.ZipFile(exported) as zin, zipfile.ZipFile(source, "w") as zout:
            for item in zin.infolist():
                zout.writestr(item.filename, zin.read(item))
    path = tmp_path / "latin.pt2"
    path.write_bytes(source.read_bytes().replace(old, new))
    with pytest.raises(LoadError):
        load_model(path)


@pytest.mark.slow
def test_an_empty_weight_that_declares_gigabytes_is_refused_within_1_gb(exported, tmp_path):
    """torch fills a weight with an empty record with torch.zeros(its declared sizes): 0 bytes
    in the file claimed 1.6 GB of memory (2.2 GB peak RSS)."""

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/weight_0"):
            return b""
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                if entry["path_name"] == "weight_0":
                    entry["tensor_meta"]["sizes"] = [{"as_int": 20000}, {"as_int": 20000}]
                    entry["tensor_meta"]["strides"] = [{"as_int": 20000}, {"as_int": 1}]
            return json.dumps(config).encode()
        return data

    path = rewrite_zip(exported, tmp_path / "zeros.pt2", edit)
    code = f"from introspect import load_model, LoadError\ntry:\n    load_model({str(path)!r})\nexcept LoadError as e:\n    print(e)\n"
    result = run_limited(code, timeout=120)
    assert "400,000,000 elements and no bytes behind them" in result["stdout"], (
        result["stdout"] + result["stderr"][-500:]
    )
    assert result["peak_rss"] < 2**30

"""Hugging Face ``save_pretrained`` folders: built from their own config.json, offline, with the
weights read as safely as any other file (safetensors, or .bin through weights_only=True)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from introspect import LoadError, UnsafeLoadError, load_model
from introspect.cli.commands import main
from introspect.load.hf_folder import is_hf_folder, weight_files
from introspect.load.models import load_weights
from tests.support.events import read_events
from tests.support.hf_models import MODELS, SAVE_FORMATS, save, token_ids
from tests.support.saved_models import save_code_running_pickle

CASES = [(name, fmt) for name in MODELS for fmt in SAVE_FORMATS]
CASE_IDS = [f"{name}-{fmt}" for name, fmt in CASES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{(name, fmt): (folder, model)}``: each tiny model saved in each format (seeded)."""
    saved = {}
    for name, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        for fmt in SAVE_FORMATS:
            saved[name, fmt] = save(model, tmp_path_factory.mktemp(f"{name}-{fmt}"), fmt), model
    return saved


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_model_rebuilds_the_saved_model(folders, case):
    folder, original = folders[case]
    assert is_hf_folder(folder)
    loaded = load_model(folder)
    assert type(loaded) is type(original) and not loaded.training
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, original(x).logits)


@pytest.mark.parametrize("fmt", SAVE_FORMATS)
def test_a_tied_head_stored_once_is_tied_again(folders, fmt):
    folder, _ = folders["gpt2", fmt]
    stored = set()
    for file in weight_files(folder):
        stored |= set(load_weights(file))
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored  # save_pretrained stores it once
    model = load_model(folder)
    assert model.lm_head.weight is model.transformer.wte.weight
    # and parameters() (so the weights command and the summary) count it once
    assert list(load_weights(folder)) == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in load_weights(folder)


def test_sharded_checkpoints_are_read_through_their_index(folders):
    folder, _ = folders["bert", "sharded_bin"]
    files = weight_files(folder)
    assert len(files) > 1 and all(f.name.startswith("pytorch_model-") and f.suffix == ".bin" for f in files)
    assert not (folder / "model.safetensors").exists()


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_summary_of_a_folder_counts_the_parameters_like_the_model(folders, case):
    folder, original = folders[case]
    result = run("summary", folder, "--input-shape", "2,8", "--dtype", "int64")
    assert result.exit_code == 0, result.output
    count = sum(p.numel() for p in original.parameters())
    assert f"Total params: {count:,}" in result.stdout
    assert f"Trainable params: {count:,}" in result.stdout


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_activations_of_a_folder_writes_histograms(folders, case, tmp_path):
    folder, _ = folders[case]
    result = run("activations", folder, "--input-shape", "2,8", "--dtype", "int64", "--logdir", tmp_path, "--backward")
    assert result.exit_code == 0, result.output
    tags = set(read_events(tmp_path).Tags()["histograms"])
    layer = "transformer.h.0.attn.c_attn" if case[0] == "gpt2" else "bert.encoder.layer.0.attention.self.query"
    assert {f"activations/{layer}", f"activation_grads/{layer}"} <= tags, sorted(tags)[:10]


def test_weights_and_graph_of_a_folder(folders, tmp_path):
    folder, original = folders["gpt2", "safetensors"]
    result = run("weights", folder)
    assert result.exit_code == 0, result.output
    names = [n for n, _ in original.named_parameters()]
    assert all(n in result.stdout for n in names) and "lm_head.weight" not in result.stdout
    result = run("graph", folder, "--input-shape", "2,8", "--dtype", "int64", "--logdir", tmp_path)
    assert result.exit_code == 0, result.output
    assert "module-level graph written" in result.stderr
    assert any("transformer.h.0.attn.c_attn" in n.name for n in read_events(tmp_path).Graph().node)


# --------------------------------------------------------------------------- what is refused
def copy_of(source, folder, config: dict | None = None, weights: bool = True):
    """``folder`` with ``source``'s config.json (or ``config``) and, with ``weights``, its weights."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config) if config else (source / "config.json").read_text())
    if weights:
        (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return folder


def test_a_config_without_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    line = one_line_error(run("summary", tmp_path, "--input-shape", "2,8", "--dtype", "int64"), 3)
    assert "has a config.json but no weights: none of model.safetensors" in line


def test_a_folder_that_needs_its_own_code_is_refused_and_its_code_never_runs(folders, tmp_path):
    source, _ = folders["gpt2", "safetensors"]
    marker = tmp_path / "ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    copy_of(source, tmp_path, config)
    with pytest.raises(LoadError, match="needs its own Python code to build"):
        load_model(tmp_path)
    assert not marker.exists()


def test_a_bin_that_would_run_code_is_refused(folders, tmp_path):
    source, _ = folders["gpt2", "safetensors"]
    copy_of(source, tmp_path, weights=False)
    marker = tmp_path / "unpickled"
    save_code_running_pickle(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeLoadError, match="refusing to load"):
        load_model(tmp_path)
    assert not marker.exists()


def test_a_shard_outside_the_folder_is_refused(folders, tmp_path):
    source, _ = folders["gpt2", "safetensors"]
    (tmp_path / "outside.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    folder = copy_of(source, tmp_path / "model", weights=False)
    index = {"weight_map": {"transformer.wte.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="names a shard '../outside.safetensors' that is not a file in"):
        load_model(folder)


def test_weights_that_do_not_fit_the_config_are_listed(folders, tmp_path):
    source, _ = folders["gpt2", "safetensors"]
    config = json.loads((source / "config.json").read_text())
    config["n_embd"] = 64
    copy_of(source, tmp_path, config)
    line = one_line_error(run("summary", tmp_path, "--input-shape", "2,8", "--dtype", "int64"), 6)
    assert (
        "do not fit GPT2LMHeadModel" in line
        and "shape mismatches (transformer.wte.weight: file [100, 32] vs model [100, 64]" in line
    )


def test_without_transformers_a_folder_is_a_clear_error(folders, monkeypatch):
    folder, _ = folders["gpt2", "safetensors"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is absent
    with pytest.raises(LoadError, match=r"building it needs the transformers package: pip install"):
        load_model(folder)


def test_a_plain_directory_is_not_a_hugging_face_folder(tmp_path):
    assert not is_hf_folder(tmp_path)
    with pytest.raises(LoadError):
        load_model(tmp_path)

"""Loading saved models: every format round-trips, unsafe pickles are refused, bad files are named."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import introspect
from introspect import (
    ArchitectureError,
    InputShapeError,
    KeyMismatchError,
    LoadError,
    ModelTypeError,
    UnsafeLoadError,
    load_model,
)
from introspect.analysis.weight_stats import (
    compare_weights,
    weight_stats,
    write_weight_histograms,
)
from introspect.live.record_activations import record_activations
from introspect.load.formats import detect_format
from introspect.load.model_inputs import (
    check_input,
    expected_input,
    image_batches,
    image_files,
    parse_shape,
)
from introspect.load.models import build_architecture, load_weights
from tests.support.events import read_events
from tests.support.hooks import count_hooks, hook_state
from tests.support.saved_models import (
    MODEL_FORMATS,
    SEED_ARCH,
    WEIGHT_FORMATS,
    X,
    export_with_code_running_part,
    save_code_running_pickle,
    seed_cnn,
    storages_tagged_cuda,
)


def assert_same_model(model: nn.Module, expected: torch.Tensor) -> None:
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 54_273
    with torch.no_grad():
        assert torch.equal(model(X), expected)


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_weights_round_trip_with_an_architecture(saved, fmt):
    files, expected = saved
    model = load_model(files[fmt], arch=SEED_ARCH)
    assert type(model).__name__ == "SeedCNN"
    assert_same_model(model, expected)


@pytest.mark.parametrize("fmt", MODEL_FORMATS)
def test_files_that_carry_their_model_need_no_architecture(saved, fmt):
    files, expected = saved
    model = load_model(files[fmt], unsafe=fmt != "export")  # running TorchScript runs its code: --unsafe
    assert_same_model(model, expected)
    # ... and with --arch their weights go into the Python class (e.g. to watch a TorchScript model)
    eager = load_model(files[fmt], arch=SEED_ARCH)
    assert type(eager).__name__ == "SeedCNN"
    assert_same_model(eager, expected)


def test_export_program_is_unflattened_into_named_layers(saved):
    files, _ = saved
    model = load_model(files["export"])
    names = [n for n, _ in model.named_modules()]
    assert {"conv1", "conv2", "linear1", "linear2", "relu"} <= set(names)


def test_pickled_module_needs_unsafe(saved):
    files, expected = saved
    with pytest.raises(UnsafeLoadError) as info:
        load_model(files["pickled"])
    message = str(info.value)
    assert "arbitrary code" in message and "unsafe" in message
    assert "examples.models.SeedCNN" in message  # what the pickle would import
    assert_same_model(load_model(files["pickled"], unsafe=True), expected)


def test_detect_format_reads_bytes_not_names(saved, tmp_path):
    files, _ = saved
    for fmt, kind in [
        ("state_dict", "torch"),
        ("torchscript", "torchscript"),
        ("export", "export"),
        ("safetensors", "safetensors"),
        ("pickled", "torch"),
    ]:
        renamed = tmp_path / f"{fmt}.bin"
        renamed.write_bytes(files[fmt].read_bytes())
        assert detect_format(renamed) == kind


def test_legacy_torch_save_format(tmp_path):
    model = seed_cnn()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load_model(path, arch=SEED_ARCH)
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_lightning_style_prefix_is_stripped_when_it_then_fits(tmp_path):
    model = seed_cnn()
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    assert torch.equal(load_model(path, arch=SEED_ARCH).linear2.bias, model.linear2.bias)


def test_torchvision_architecture_with_kwargs(tmp_path):
    torch.manual_seed(0)
    net = build_architecture("torchvision:resnet18", {"num_classes": 10})
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model(path, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    assert loaded.fc.out_features == 10
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)
    assert not loaded.training


def test_timm_architecture_by_name(tmp_path):
    pytest.importorskip("timm")
    from click.testing import CliRunner

    from introspect.cli.commands import main

    torch.manual_seed(0)
    net = build_architecture("timm:resnet18", {"num_classes": 10})
    path = tmp_path / "timm_r18.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(path))
    loaded = load_model(path, arch="timm:resnet18", arch_kwargs={"num_classes": 10})
    assert type(loaded).__module__.startswith("timm.") and loaded.fc.out_features == 10
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    result = CliRunner().invoke(
        main,
        [
            "summary",
            str(path),
            "--arch",
            "timm:resnet18",
            "--arch-kwargs",
            '{"num_classes": 10}',
            "--input-shape",
            "1,3,64,64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"Total params: {sum(p.numel() for p in net.parameters()):,}" in result.stdout


def test_timm_names_and_pretrained_are_checked():
    pytest.importorskip("timm")
    with pytest.raises(ArchitectureError, match="timm has no model 'resnet181'; did you mean resnet18"):
        build_architecture("timm:resnet181")
    with pytest.raises(ArchitectureError, match="pretrained=False"):
        build_architecture("timm:resnet18", {"pretrained": True})


def test_an_architecture_in_the_current_directory_is_found(tmp_path, monkeypatch):
    """As ``python -m`` would: the console script does not put the current directory on sys.path."""
    (tmp_path / "my_models").mkdir()
    (tmp_path / "my_models" / "__init__.py").write_text(
        "from torch import nn\n\ndef tiny():\n    return nn.Linear(2, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert build_architecture("my_models:tiny").out_features == 3
    assert sys.path[-1] == str(tmp_path)  # appended: nothing installed is shadowed
    with pytest.raises(ArchitectureError, match="cannot import 'not_here'"):
        build_architecture("not_here:tiny")


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path):
    model = seed_cnn()
    path = tmp_path / "cuda.pt"
    with storages_tagged_cuda():
        torch.save({"model": model.state_dict()}, path)
    if not torch.cuda.is_available():  # the file really does need CUDA without map_location
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded = load_model(path, arch=SEED_ARCH)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.conv2.weight, model.conv2.weight)


# --------------------------------------------------------------------------- refusing code
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = save_code_running_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeLoadError, match="arbitrary code"):
        load_model(path, arch=SEED_ARCH)
    with pytest.raises(UnsafeLoadError):
        load_weights(path)
    assert not marker.exists()
    # The test can fail: with unsafe=True the very same file does run its code.
    with pytest.raises(LoadError):
        load_model(path, arch=SEED_ARCH, unsafe=True)
    assert marker.read_text() == "unpickled"


def test_export_archive_with_a_code_running_part_is_refused(saved, tmp_path):
    files, _ = saved
    marker = tmp_path / "marker.txt"
    path = export_with_code_running_part(files["export"], tmp_path / "evil.pt2", marker)
    with pytest.raises(UnsafeLoadError, match="arbitrary code"):
        load_model(path)
    assert not marker.exists()
    # torch.export.load itself would run it (it falls back to weights_only=False for sample inputs).
    try:
        load_model(path, unsafe=True)
    except LoadError:
        pass
    assert marker.exists()


# --------------------------------------------------------------------------- bad files
def test_missing_empty_corrupt_and_truncated_files(saved, tmp_path):
    files, _ = saved
    with pytest.raises(LoadError, match="no such file"):
        load_model(tmp_path / "nope.pt", arch=SEED_ARCH)
    with pytest.raises(LoadError, match="is a directory"):
        load_model(tmp_path, arch=SEED_ARCH)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="is empty"):
        load_model(empty, arch=SEED_ARCH)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(LoadError, match="not a file we can read"):
        load_model(text, arch=SEED_ARCH)
    for fmt in ("state_dict", "torchscript", "export"):
        data = files[fmt].read_bytes()
        cut = tmp_path / f"cut_{fmt}.pt"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(LoadError, match="truncated or corrupt"):
            load_model(cut, arch=SEED_ARCH)
    garbled = tmp_path / "garbled.pt"
    data = bytearray(files["state_dict"].read_bytes())
    data[200:600] = bytes(400)
    garbled.write_bytes(bytes(data))
    with pytest.raises(LoadError):
        load_model(garbled, arch=SEED_ARCH)


def test_checkpoint_without_a_state_dict_lists_its_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "weights_ema": {"a": 1}}, path)
    with pytest.raises(LoadError, match=r"keys \['epoch', 'weights_ema'\]"):
        load_model(path, arch=SEED_ARCH)


def test_weights_without_an_architecture(saved):
    files, _ = saved
    with pytest.raises(ArchitectureError, match="only weights.*--arch"):
        load_model(files["state_dict"])


@pytest.mark.parametrize(
    "arch, message",
    [
        ("examples.models:SeedCNNN", "did you mean SeedCNN"),
        ("no_such_package.models:Net", "cannot import 'no_such_package.models'"),
        ("torchvision:resnet19", "did you mean resnet18"),
        ("SeedCNN", "must look like 'package.module:Class'"),
        ("examples.models:__all__", "not a class or function"),
    ],
)
def test_unknown_architectures(saved, arch, message):
    files, _ = saved
    with pytest.raises(ArchitectureError, match=message):
        load_model(files["state_dict"], arch=arch)


def test_architecture_kwargs_that_do_not_build(saved):
    files, _ = saved
    with pytest.raises(ArchitectureError, match="unexpected keyword argument 'width'"):
        load_model(files["state_dict"], arch=SEED_ARCH, arch_kwargs={"width": 2})
    with pytest.raises(ArchitectureError, match="weights=None"):
        load_model(files["state_dict"], arch="torchvision:resnet18", arch_kwargs={"weights": "DEFAULT"})


def test_mismatched_keys_are_listed(tmp_path):
    state = seed_cnn().state_dict()
    partial = dict(state)
    del partial["linear2.bias"]
    partial["head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    with pytest.raises(KeyMismatchError) as info:
        load_model(path, arch=SEED_ARCH)
    assert "1 missing key (linear2.bias); 1 unexpected key (head.weight)" in str(info.value)

    with pytest.raises(
        KeyMismatchError,
        match=r"keys \(bn1.weight, bn1.bias, .*, \.\.\. \d+ more\).*conv1.weight: file \[32, 3, 3, 3\] vs model \[64, 3, 7, 7\]",
    ):
        load_model(path, arch="torchvision:resnet18")

    reshaped = dict(state, **{"linear2.weight": torch.zeros(2, 32), "linear2.bias": torch.zeros(2)})
    torch.save(reshaped, path)
    with pytest.raises(KeyMismatchError, match=r"linear2.weight: file \[2, 32\] vs model \[1, 32\]"):
        load_model(path, arch=SEED_ARCH)


def test_safetensors_without_the_package(saved, monkeypatch):
    files, _ = saved
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(LoadError, match="pip install safetensors"):
        load_model(files["safetensors"], arch=SEED_ARCH)


# --------------------------------------------------------------------------- weights
def test_load_weights_needs_no_architecture(saved):
    files, _ = saved
    model = seed_cnn()
    bare = load_weights(files["checkpoint"])
    assert list(bare) == list(model.state_dict())
    scripted = load_weights(files["torchscript"])
    assert list(scripted) == [n for n, _ in model.named_parameters()]
    assert torch.equal(scripted["conv1.weight"], model.conv1.weight)


def test_weight_stats_numbers():
    t = torch.tensor([0.0, 0.0, 1.0, 3.0, float("nan"), float("inf")])
    (s,) = weight_stats({"w": t})
    finite = torch.tensor([0.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    assert s.shape == (6,)
    assert s.mean == pytest.approx(1.0) and s.std == pytest.approx(float(finite.std(correction=0)))
    assert (s.min, s.max) == (0.0, 3.0)
    assert s.zero_fraction == pytest.approx(2 / 6)
    assert s.nonfinite == 2


def test_compare_weights():
    a = {"w": torch.tensor([3.0, 4.0]), "b": torch.ones(2), "gone": torch.ones(1), "grown": torch.ones(2)}
    b = {"w": torch.tensor([3.0, 5.0]), "b": torch.ones(2), "grown": torch.ones(3), "new": torch.ones(1)}
    changes = {c.name: c for c in compare_weights(a, b)}
    assert changes["w"].relative_change == pytest.approx(1 / 5) and changes["w"].max_abs_change == 1.0
    assert changes["b"].relative_change == 0.0
    assert changes["gone"].status == "only in A" and changes["new"].status == "only in B"
    assert changes["grown"].status.startswith("shape differs") and math.isnan(changes["grown"].relative_change)


def test_weight_histograms_read_back(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model = seed_cnn()
    named = dict(model.named_parameters())
    writer = SummaryWriter(str(tmp_path))
    write_weight_histograms(writer, named, step=0)
    writer.close()
    acc = read_events(tmp_path)
    assert set(acc.Tags()["histograms"]) == {f"weights/{n}" for n in named}
    h = acc.Histograms("weights/conv1.weight")[0].histogram_value
    assert h.num == 864 and h.min == pytest.approx(float(model.conv1.weight.detach().min()))


# --------------------------------------------------------------------------- inputs
def test_parse_shape():
    assert parse_shape("1,3,32,32") == (1, 3, 32, 32) == parse_shape("1x3x32x32")
    for bad in ("", "1,,3", "1,-3", "a,b", "0,3"):
        with pytest.raises(introspect.ConfigError, match="1,3,32,32"):
            parse_shape(bad)


def test_wrong_input_shape_shows_the_expected_one(saved):
    files, _ = saved
    for fmt in ("state_dict", "torchscript"):
        model = load_model(files[fmt], arch=SEED_ARCH if fmt == "state_dict" else None, unsafe=fmt == "torchscript")
        with pytest.raises(InputShapeError) as info:
            check_input(model, (torch.randn(1, 1, 32, 32),))
        message = str(info.value)
        assert "[1, 1, 32, 32]" in message
        assert "expects [N, 3, H, W] (conv1 is a Conv2d with 3 input channels)" in message
    exported = load_model(files["export"])
    with pytest.raises(InputShapeError, match="to be equal to 1, but got 2"):  # export's static batch
        check_input(exported, (torch.randn(2, 3, 32, 32),))
    assert (
        expected_input(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))
        == "[..., 12] (1 is a Linear with 12 input features)"
    )
    assert expected_input(nn.Sequential(nn.ReLU())) is None


def test_image_folder_batches(tmp_path):
    from examples.data import write_image_folder

    write_image_folder(tmp_path / "images", n_per_class=3)
    files = image_files(tmp_path / "images")
    assert len(files) == 6
    batches = list(image_batches(files, batch_size=4))
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert 0.0 <= float(batches[0].min()) and float(batches[0].max()) <= 1.0
    assert next(iter(image_batches(files, 2, size=(16, 20), channels=1))).shape == (2, 1, 16, 20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no images"):
        image_files(tmp_path / "empty")


# --------------------------------------------------------------------------- activations
def test_record_activations_through_watch(saved, tmp_path):
    files, _ = saved
    model = load_model(files["state_dict"], arch=SEED_ARCH)
    before = count_hooks(hook_state(model))
    batches = [(torch.randn(4, 3, 32, 32),) for _ in range(3)]
    w = record_activations(model, batches, tmp_path, backward=True, target=0)
    assert w.step == 2
    assert count_hooks(hook_state(model)) == before
    assert not any(m.training for m in model.modules())  # modes put back
    assert all(p.grad is None for p in model.parameters())
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["histograms"])
    assert {"activations/conv1", "activations/linear2", "activation_grads/conv1", "grads/conv1.weight"} <= tags
    assert [e.step for e in acc.Histograms("activations/conv1")] == [0, 1, 2]
    assert acc.Histograms("activations/conv1")[0].histogram_value.num == 4 * 32 * 30 * 30
    # Each batch's first input as a grid of conv1's and conv2's channels.
    assert {"feature_maps/conv1", "feature_maps/conv2"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("feature_maps/conv1")] == [0, 1, 2]


def test_record_activations_runs_layers_as_in_inference_unless_asked(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten()).eval()
    stats = model[1].running_mean.clone()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    record_activations(model, [(x,)], tmp_path / "eval")
    assert torch.equal(model[1].running_mean, stats)  # BatchNorm in eval: running stats untouched
    h = read_events(tmp_path / "eval").Histograms("activations/3")[0].histogram_value
    assert h.sum == pytest.approx(float(expected.double().sum()), rel=1e-6)  # no dropout
    record_activations(model, [(x,)], tmp_path / "train", train_mode=True)
    assert not torch.equal(model[1].running_mean, stats)
    assert not model.training and not model[1].training


def test_record_activations_refuses_torchscript(saved, tmp_path):
    files, _ = saved
    with pytest.raises(ModelTypeError, match="--arch"):
        record_activations(load_model(files["torchscript"], unsafe=True), [(X,)], tmp_path)


def test_record_activations_bad_target_and_shape(saved, tmp_path):
    files, _ = saved
    model = load_model(files["state_dict"], arch=SEED_ARCH)
    with pytest.raises(introspect.ConfigError, match="target 3 is out of range"):
        record_activations(model, [(X,)], tmp_path / "a", backward=True, target=3)
    with pytest.raises(InputShapeError, match=r"expects \[N, 3, H, W\]"):
        record_activations(model, [(torch.randn(1, 32, 32),)], tmp_path / "b")
    assert count_hooks(hook_state(model)) == 0

"""Which modules and parameters a watcher looks at, and under which names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from introspect import ConfigError, ModelTypeError, watch
from introspect.runtime.selection import (
    root_name,
    select_modules,
    select_parameters,
    unwrap_model,
)
from tests.support import QUIET
from tests.support.events import histogram_tags, read_events, tags_with_prefix
from tests.support.training import train
from tests.support.zoo import SEED_CNN_MODULES, SeedCNN, seed_cnn_batch, seed_cnn_loss


class Block(nn.Module):
    """A container that also owns a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.block = Block()
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


# --------------------------------------------------------------------------- default
def test_default_is_modules_with_own_parameters_and_leaves():
    model = Net()
    chosen = select_modules(model)
    # Leaves and the Block that owns `gain`; not the root, not the plain Sequential containers.
    assert list(chosen) == ["stem", "block", "block.inner.0", "block.inner.1", "head.0", "head.1"]
    assert chosen["block"] is model.block
    assert chosen["head.1"] is model.head[1]


def test_default_on_the_seed_cnn():
    assert list(select_modules(SeedCNN())) == list(SEED_CNN_MODULES)


def test_root_with_own_parameters_is_tagged_model():
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * self.scale

    model = WithScale()
    chosen = select_modules(model)
    assert list(chosen) == ["model", "lin"]
    assert chosen["model"] is model
    assert list(select_parameters(model, chosen)) == ["scale", "lin.weight", "lin.bias"]


def test_root_name_avoids_a_child_called_model():
    outer = nn.Sequential()
    outer.add_module("model", nn.Linear(2, 2))
    assert root_name(outer) == "model(root)"
    assert root_name(nn.Linear(2, 2)) == "model"
    chosen = select_modules(outer, include=["", "model"])
    assert set(chosen) == {"model(root)", "model"}
    assert chosen["model(root)"] is outer
    assert chosen["model"] is outer.model


def test_leaf_root():
    lin = nn.Linear(3, 3)
    assert list(select_modules(lin)) == ["model"]
    assert list(select_parameters(lin, select_modules(lin))) == ["weight", "bias"]


# --------------------------------------------------------------------------- include / exclude
@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        ("conv*", None, ["conv1", "conv2"]),
        (nn.Linear, None, ["linear1", "linear2"]),
        (["conv1", nn.Linear], None, ["conv1", "linear1", "linear2"]),
        ((nn.MaxPool2d, nn.AdaptiveMaxPool2d), None, ["pool1", "pool2", "adaptive_pool"]),
        ("*pool*", "adaptive_pool", ["pool1", "pool2"]),
        (None, "pool*", ["conv1", "conv2", "dropout", "adaptive_pool", "flatten", "linear1", "relu", "linear2"]),
        (None, [nn.Conv2d, "linear?"], ["pool1", "pool2", "dropout", "adaptive_pool", "flatten", "relu"]),
        (None, nn.Module, []),
        ("", None, ["model"]),
        ("model", None, ["model"]),
        (["model", "linear2"], None, ["model", "linear2"]),
        (nn.Module, ["", "*pool*", "flatten", "dropout", "relu"], ["conv1", "conv2", "linear1", "linear2"]),
    ],
    ids=[
        "glob",
        "type",
        "glob+type",
        "tuple-of-types",
        "include-minus-exclude",
        "exclude-glob",
        "exclude-type+glob",
        "exclude-everything",
        "root-by-empty-name",
        "root-by-tag",
        "root-and-leaf",
        "all-minus-some",
    ],
)
def test_include_exclude(include, exclude, expected):
    assert list(select_modules(SeedCNN(), include, exclude)) == expected


def test_include_matches_containers_too():
    model = Net()
    chosen = select_modules(model, include="head")
    assert list(chosen) == ["head"]
    assert chosen["head"] is model.head
    # A container that owns no parameter of its own contributes none.
    assert select_parameters(model, chosen) == {}


def test_include_matching_nothing_lists_real_names():
    with pytest.raises(ConfigError) as info:
        select_modules(SeedCNN(), include=["encoder.*", nn.LSTM])
    message = str(info.value)
    assert "encoder.*" in message
    assert "conv1" in message and "pool1" in message


@pytest.mark.parametrize(
    "bad", [3, [nn.Linear, 1.5], [torch.zeros(1)], [int]], ids=["int", "float-in-list", "tensor", "non-module-type"]
)
@pytest.mark.parametrize("option", ["include", "exclude"])
def test_bad_filters_are_config_errors(bad, option):
    with pytest.raises(ConfigError) as info:
        select_modules(SeedCNN(), **{option: bad})
    assert option in str(info.value)


def test_select_modules_needs_a_module():
    with pytest.raises(ModelTypeError):
        select_modules("conv1")


# --------------------------------------------------------------------------- parameters
def test_parameters_of_selected_modules_only():
    model = SeedCNN()
    chosen = select_modules(model, include="linear*")
    assert list(select_parameters(model, chosen)) == [
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    ]


def test_frozen_parameters_are_left_out():
    model = SeedCNN()
    model.conv1.weight.requires_grad_(False)
    params = select_parameters(model, select_modules(model))
    assert "conv1.weight" not in params
    assert "conv1.bias" in params
    assert list(params) == [n for n, p in model.named_parameters() if p.requires_grad]


def test_tied_parameters_are_named_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.decode = nn.Linear(4, 10, bias=False)
            self.decode.weight = self.embed.weight

        def forward(self, idx):
            return self.decode(self.embed(idx))

    model = Tied()
    params = select_parameters(model, select_modules(model))
    assert list(params) == [n for n, _ in model.named_parameters()] == ["embed.weight"]


# --------------------------------------------------------------------------- wrappers
def test_unwrap_data_parallel():
    model = SeedCNN()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model


@pytest.mark.slow  # importing torch._dynamo takes seconds
def test_unwrap_compile():
    model = SeedCNN()
    compiled = torch.compile(model)  # not run: wrapping is enough
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(compiled)) is model
    assert list(select_modules(unwrap_model(compiled))) == list(SEED_CNN_MODULES)


def test_wrapped_model_tags_are_the_users_names(writer, logdir):
    torch.manual_seed(0)
    model = SeedCNN()
    wrapped = nn.DataParallel(model)  # on CPU it simply calls the module
    with watch(wrapped, writer, every=1, **QUIET) as w:
        assert w.module_names == list(SEED_CNN_MODULES)
        train(wrapped, seed_cnn_batch, seed_cnn_loss, 2)
        assert w.step == 1
    acc = read_events(logdir)
    assert "activations/conv1" in histogram_tags(acc)
    assert "weights/conv1.weight" in histogram_tags(acc)
    assert not [t for t in histogram_tags(acc) if "module." in t]


# --------------------------------------------------------------------------- through watch()
def test_watch_writes_only_selected_modules(writer, logdir):
    torch.manual_seed(0)
    model = SeedCNN()
    with watch(model, writer, every=1, include=["conv*", nn.Linear], exclude="linear2", **QUIET) as w:
        assert w.module_names == ["conv1", "conv2", "linear1"]
        assert w.parameter_names == [
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
            "linear1.weight",
            "linear1.bias",
        ]
        train(model, seed_cnn_batch, seed_cnn_loss, 1)
    acc = read_events(logdir)
    assert {t.split("/", 1)[1] for t in tags_with_prefix(acc, "activations/")} == {"conv1", "conv2", "linear1"}
    assert {t.split("/", 1)[1] for t in tags_with_prefix(acc, "activation_grads/")} == {"conv1", "conv2", "linear1"}
    assert {t.split("/", 1)[1] for t in tags_with_prefix(acc, "grads/")} == set(w.parameter_names)
    assert {t.split("/", 1)[1] for t in tags_with_prefix(acc, "weights/")} == set(w.parameter_names)


def test_watch_a_container_block_output(writer, logdir):
    torch.manual_seed(0)
    model = Net()
    with watch(model, writer, every=1, include=["block", "model"], **QUIET):
        train(model, lambda: (torch.randn(5, 3), torch.randn(5, 2)), F.mse_loss, 1)
    acc = read_events(logdir)
    assert {t for t in histogram_tags(acc) if t.startswith("activations/")} == {
        "activations/block",
        "activations/model",
    }
    assert read_events(logdir).Histograms("activations/block")[0].histogram_value.num == 5 * 4

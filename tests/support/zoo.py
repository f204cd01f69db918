"""The model zoo the watch() tests run over: small, random-weight models of every shape we promise.

Each entry is a :class:`ZooCase`: how to build the model, how to make one batch ``(input, target)``
and the loss of the model's output against the target. ``activations`` lists activation tags that
must appear (module names, with the output suffix for multi-output modules, ``model`` for the
root); ``activation_grads`` lists outputs whose gradient must be logged too (with the same
``num`` as the activation: in-place activations and shared modules included); ``frozen`` lists
parameters that must get neither ``weights/`` nor ``grads/`` tags.

Models and batches draw from the global torch RNG, so a test seeds once and gets the same model and
the same batches on every run.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from examples.models import (
    SeedCNN,  # one definition, shared with the examples (conftest puts the repo on sys.path)
)

__all__ = [
    "ZooCase",
    "ZOO",
    "ZOO_IDS",
    "SeedCNN",
    "PackedLSTM",
    "MLP",
    "SEED_CNN_PARAMS",
    "seed_cnn_batch",
    "seed_cnn_loss",
]


@dataclass(frozen=True)
class ZooCase:
    name: str
    build_model: Callable[[], nn.Module]
    make_input: Callable[[], tuple[Any, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    activations: tuple[str, ...] = ()
    activation_grads: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    marks: tuple[Any, ...] = field(default=())


# --------------------------------------------------------------------------- models
SEED_CNN_PARAMS = 54_273
SEED_CNN_MODULES = (
    "conv1",
    "pool1",
    "conv2",
    "pool2",
    "dropout",
    "adaptive_pool",
    "flatten",
    "linear1",
    "relu",
    "linear2",
)


def seed_cnn_batch(n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, size, size), torch.randn(n, 1)


def seed_cnn_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def MLP() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class LSTMNet(nn.Module):
    """nn.LSTM inside a module: its output is ``(out, (h, c))``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        return self.head(out[:, -1])


class PackedLSTM(nn.Module):
    """An LSTM fed a PackedSequence, and a head on its last hidden state."""

    def __init__(self, hidden: int = 6, outputs: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, packed: Any) -> torch.Tensor:
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


def _sequence_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 5, 8), torch.randn(2, 1)


def _lstm_root_loss(out: Any, y: Any) -> torch.Tensor:
    seq, (h, c) = out
    return seq.pow(2).mean() + h.mean()


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _transformer_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 6, 16), torch.randn(2, 6, 16)


class SharedLinear(nn.Module):
    """One Linear called twice in one forward: its calls are merged into one histogram per step."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(self.act(self.shared(x))))


def _vector_batch(features: int = 8, targets: int = 2) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(4, features), torch.randn(4, targets)

    return make


class DictHeads(nn.Module):
    """A leaf with parameters of its own that returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.wa = nn.Parameter(torch.randn(8, 3) * 0.3)
        self.wb = nn.Parameter(torch.randn(8, 2) * 0.3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": x @ self.wa, "b": x @ self.wb}


class DictModel(nn.Module):
    """Returns a dict; the root owns a parameter, so the root itself is watched (tag ``model``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.heads = DictHeads()
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        heads = self.heads(h)
        logits = heads["a"] / self.temperature + heads["b"].mean(-1, keepdim=True)
        return {"logits": logits, "features": h}


def _dict_loss(out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"], y) + 0.01 * out["features"].pow(2).mean()


def _dict_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 8), torch.randint(0, 3, (4,))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


Output = namedtuple("Output", ["logits", "hidden"])


class NamedTupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 6)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> Output:
        hidden = torch.tanh(self.encoder(x)) * self.scale
        return Output(logits=hidden[:, :2], hidden=hidden)


def _namedtuple_loss(out: Output, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.logits, y) + 0.01 * out.hidden.pow(2).mean()


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def _mobilenet() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)


def _image_batch(size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))

    return make


# --------------------------------------------------------------------------- the table
ZOO: list[ZooCase] = [
    ZooCase(
        "seed_cnn",
        SeedCNN,
        seed_cnn_batch,
        seed_cnn_loss,
        activations=SEED_CNN_MODULES,
        activation_grads=SEED_CNN_MODULES,
    ),
    ZooCase(
        "mlp",
        MLP,
        _vector_batch(10, 4),
        F.mse_loss,
        activations=("0", "1", "2", "3", "4"),
        activation_grads=("0", "1", "2", "3", "4"),
    ),
    ZooCase(
        "resnet18",
        _resnet18,
        _image_batch(32),
        F.cross_entropy,
        activations=(
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1.0.conv1",
            "layer1.0.bn1",
            "layer1.0.relu",
            "layer2.0.downsample.0",
            "layer4.1.bn2",
            "avgpool",
            "fc",
        ),
        activation_grads=("conv1", "bn1", "relu", "layer1.0.bn1", "layer1.0.relu", "layer4.1.bn2", "fc"),
    ),
    ZooCase(
        "mobilenet_v3_small",
        _mobilenet,
        _image_batch(64),
        F.cross_entropy,
        activations=(
            "features.0.0",
            "features.0.1",
            "features.0.2",  # Hardswish(inplace=True)
            "features.1.block.1.fc1",
            "features.1.block.1.scale_activation",
            "avgpool",
            "classifier.1",  # Hardswish(inplace=True)
            "classifier.3",
        ),
        activation_grads=("features.0.1", "features.0.2", "features.1.block.1.scale_activation", "classifier.1"),
    ),
    ZooCase(
        "lstm_in_module",
        LSTMNet,
        _sequence_batch,
        F.mse_loss,
        activations=("lstm/0", "lstm/1/0", "lstm/1/1", "head"),
        activation_grads=("lstm/0", "head"),
    ),
    ZooCase(
        "lstm_root",
        lambda: nn.LSTM(8, 16, batch_first=True),
        _sequence_batch,
        _lstm_root_loss,
        activations=("model/0", "model/1/0", "model/1/1"),
        activation_grads=("model/0", "model/1/0"),
    ),
    ZooCase(
        "transformer_encoder",
        _transformer,
        _transformer_batch,
        F.mse_loss,
        activations=(
            "layers.0.self_attn",
            "layers.0.linear1",
            "layers.0.linear2",
            "layers.0.norm1",
            "layers.0.dropout1",
            "layers.1.norm2",
        ),
        activation_grads=("layers.0.self_attn", "layers.0.linear1", "layers.1.norm2"),
    ),
    ZooCase(
        "shared_linear",
        SharedLinear,
        _vector_batch(8, 2),
        F.mse_loss,
        activations=("shared", "act", "out"),
        activation_grads=("shared", "act", "out"),
    ),
    ZooCase(
        "dict_output",
        DictModel,
        _dict_batch,
        _dict_loss,
        activations=("body", "heads/a", "heads/b", "model/logits", "model/features"),
        activation_grads=("body", "heads/a", "heads/b", "model/logits", "model/features"),
    ),
    ZooCase(
        "frozen_layers",
        _frozen,
        _vector_batch(8, 2),
        F.mse_loss,
        activations=("0", "1", "2"),
        activation_grads=("2",),  # nothing before the first trainable layer needs a gradient
        frozen=("0.weight", "0.bias"),
    ),
    ZooCase(
        "namedtuple_output",
        NamedTupleModel,
        _vector_batch(8, 2),
        _namedtuple_loss,
        activations=("encoder", "model/logits", "model/hidden"),
        activation_grads=("encoder", "model/logits", "model/hidden"),
    ),
]

ZOO_IDS = [case.name for case in ZOO]

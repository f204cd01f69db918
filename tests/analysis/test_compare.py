"""introspect.first_divergence and ``introspect compare``: a planted change named first with exact
equality before it, two checkpoints, a compiled model, bf16 autocast, a refactored class."""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from introspect import (
    ConfigError,
    Divergence,
    ModelTypeError,
    ModuleDiff,
    first_divergence,
)
from introspect.cli.commands import main
from tests.support.saved_models import SEED_ARCH, seed_cnn


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 32),
            act2=nn.Tanh(),
            fc3=nn.Linear(32, 32),
            act3=nn.ReLU(),
            out=nn.Linear(32, 4),
        )
    )


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- the planted divergence
@pytest.mark.parametrize("layer", ["fc2", "fc3", "out"])
def test_planted_nudge_is_named_first_with_exact_equality_before_it(layer):
    a = mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        getattr(b, layer).weight.add_(1e-3)
    result = first_divergence(a, b, X)
    assert isinstance(result, Divergence) and all(isinstance(d, ModuleDiff) for d in result.forward)
    order = [d.module for d in result.forward]
    assert order == ["fc1", "act1", "fc2", "act2", "fc3", "act3", "out", "model"]  # finishing order
    first = result.first
    assert first is not None and first.module == layer and first.module_type == "Linear"
    before = result.forward[: first.index]
    assert before and all(d.exact and d.max_abs == 0.0 and not d.diverged for d in before)
    assert first.max_abs > 0 and first.max_rel > 1e-4 and not first.exact
    assert all(d.diverged for d in result.forward[first.index :])  # it propagates downstream
    assert f"first divergence at {layer} (Linear)" in result.summary()
    assert f"{first.index} of the {first.index} before it exactly equal" in result.summary()
    assert "<- FIRST DIVERGENCE" in next(line for line in result.table().splitlines() if line.split()[2] == layer)


def test_planted_nudge_with_backward():
    a = mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc2.weight.add_(1e-3)
    result = first_divergence(a, b, X, backward=True)
    assert result.first.module == "fc2"
    grads = [d.module for d in result.backward]
    assert grads[0] in ("out", "model") and grads[-1] == "fc1"  # backward runs output to input
    # The gradient w.r.t. fc2's output depends on fc2's output only through act2 (tanh'):
    # everything from the output down to fc3 is unchanged upstream of the nudge's effect on act2.
    assert result.first_backward is not None
    untouched = result.backward[: result.first_backward.index]
    assert all(d.exact for d in untouched)
    assert result.first_backward.module in ("fc3", "act2", "fc2")


def test_identical_models_are_exactly_equal_and_state_is_kept():
    """The same model twice in training mode: dropout draws the same masks from the same seed,
    BatchNorm's running statistics and the parameters' .grad are put back, the caller's RNG too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)).train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    running = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    result = first_divergence(model, model, X, backward=True)
    assert result.first is None and result.first_backward is None
    assert all(d.exact for d in result.forward + result.backward)
    assert torch.equal(model[1].running_mean, running)
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0)) and model[4].weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert "no output diverges" in result.summary()
    # A different seed for B would draw other dropout masks: the seed is what makes them agree.
    other = first_divergence(model, copy.deepcopy(model), X, seed=5)
    assert other.first is None


def test_fp32_against_bf16_autocast():
    a = mlp()
    result = first_divergence(a, a, X, autocast="bf16")
    first = result.first
    assert first is not None and first.module == "fc1"  # the first op autocast runs in bf16
    assert (first.dtype_a, first.dtype_b) == ("float32", "bfloat16") and "float32 vs bfloat16" in first.note
    assert 1e-4 < first.max_rel < 0.05 and first.cosine > 0.999
    loose = first_divergence(a, a, X, autocast=torch.bfloat16, rtol=0.1)
    assert loose.first is None  # within bf16's precision everywhere
    with pytest.raises(ConfigError, match="autocast"):
        first_divergence(a, a, X, autocast="int8")


# --------------------------------------------------------------------------- a refactor
class Original(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Refactored(Original):
    """Another class, the same layers under the same names; the activation moved after the last
    layer by mistake."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.fc1(x)))


class Faithful(Refactored):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h))


def test_two_classes_with_the_same_module_names():
    a = Original()
    faithful = Faithful()
    faithful.load_state_dict(a.state_dict())
    assert first_divergence(a, faithful, X).first is None
    broken = Refactored()
    broken.load_state_dict(a.state_dict())
    result = first_divergence(a, broken, X)
    assert [d.module for d in result.forward[:1]] == ["fc1"] and result.forward[0].exact
    assert result.first.module == "act" and "shape [16, 16] in A, [16, 4] in B" in result.first.note


def test_names_that_do_not_correspond_are_an_error():
    with pytest.raises(
        ConfigError, match=r"module names do not correspond.*only in A: fc1, act1, fc2.*only in B: 0, 1, 2"
    ):
        first_divergence(mlp(), nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), X)


def test_bad_arguments():
    with pytest.raises(ModelTypeError, match="model_b must be an nn.Module"):
        first_divergence(mlp(), "model.pt", X)
    with pytest.raises(ConfigError, match="rtol"):
        first_divergence(mlp(), mlp(), X, rtol=-1)
    from introspect import InputShapeError

    with pytest.raises(InputShapeError, match="rejected an input of shape"):
        first_divergence(mlp(), mlp(), torch.randn(2, 5))


def test_nan_in_both_is_equal_and_in_one_only_diverges():
    a = mlp()
    x = X.clone()
    x[0, 0] = math.nan
    same = first_divergence(a, copy.deepcopy(a), x)
    assert same.first is None and all(d.exact for d in same.forward)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc3.bias[0] = math.nan
    result = first_divergence(a, b, X)
    assert result.first.module == "fc3" and result.first.max_abs == math.inf
    assert "NaN/Inf in one model only" in result.first.note


def test_figure():
    a = mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc3.weight.add_(1e-3)
    image = first_divergence(a, b, X, backward=True).image()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 500  # two panels
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    assert red.sum() > 50  # the first divergence's line and the diverged points


@pytest.mark.slow
def test_a_model_against_its_compiled_self():
    """torch.compile'd: the hooks fire inside the compiled graph, every module is compared, and
    the differences stay at float32 round-off (inductor fuses and reorders)."""
    a = mlp()
    compiled = torch.compile(a)
    result = first_divergence(a, compiled, X, backward=True)
    assert [d.module for d in result.forward] == ["fc1", "act1", "fc2", "act2", "fc3", "act3", "out", "model"]
    assert len(result.backward) == len(result.forward)
    assert result.first is None and result.first_backward is None
    assert max(d.max_rel for d in result.forward) < 1e-5
    assert result.forward[0].exact  # the first matmul is the same kernel
    nudged = copy.deepcopy(a)
    with torch.no_grad():
        nudged.fc3.weight.add_(1e-3)
    assert first_divergence(a, torch.compile(nudged), X).first.module == "fc3"


# --------------------------------------------------------------------------- command line
def test_cli_two_checkpoints(tmp_path):
    model = seed_cnn()
    a = tmp_path / "epoch1.pt"
    torch.save(model.state_dict(), a)
    with torch.no_grad():
        model.linear1.weight.add_(1e-3)
    b = tmp_path / "epoch2.pt"
    torch.save({"model_state_dict": model.state_dict()}, b)
    out = tmp_path / "diff.png"
    result = CliRunner().invoke(
        main,
        [
            "compare",
            str(a),
            str(b),
            "--arch",
            SEED_ARCH,
            "--input-shape",
            "4,3,32,32",
            "--backward",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "forward: first divergence at linear1 (Linear)" in result.output
    rows = [line for line in result.output.splitlines() if line.split()[1:2] == ["forward"]]
    names = [r.split()[2] for r in rows]
    assert names[: names.index("linear1")] == [
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "dropout",
        "adaptive_pool",
        "flatten",
    ]
    assert all(re.search(r"\]\s+yes\s", r) for r in rows[: names.index("linear1")])
    assert re.search(r"\]\s+no\s", rows[names.index("linear1")])
    assert f"figure written to {out}" in result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_cli_autocast_and_input_file(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(seed_cnn().state_dict(), path)
    x = tmp_path / "x.pt"
    torch.save(torch.randn(2, 3, 32, 32), x)
    result = CliRunner().invoke(
        main, ["compare", str(path), str(path), "--arch", SEED_ARCH, "--input", str(x), "--autocast", "bf16"]
    )
    assert result.exit_code == 0, result.output
    assert "(under autocast bf16)" in result.output and "first divergence at conv1 (Conv2d)" in result.output


def test_cli_errors(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(seed_cnn().state_dict(), path)
    runner = CliRunner()
    both = runner.invoke(
        main,
        ["compare", str(path), str(path), "--arch", SEED_ARCH, "--input-shape", "1,3,32,32", "--images", str(tmp_path)],
    )
    assert both.exit_code == 2 and "exactly one of --input-shape, --input or --images" in both.output
    other = runner.invoke(
        main,
        [
            "compare",
            str(path),
            str(path),
            "--arch",
            SEED_ARCH,
            "--arch-b",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,32,32",
        ],
    )
    assert other.exit_code == 6 and other.output.startswith("error:")  # the weights do not fit resnet18
    wrong_input = runner.invoke(
        main, ["compare", str(path), str(path), "--arch", SEED_ARCH, "--input-shape", "1,5,32,32"]
    )
    assert wrong_input.exit_code == 7 and "expects [N, 3, H, W]" in wrong_input.output


def test_cli_refactored_class_with_arch_b(tmp_path):
    import sys
    import types

    class Renamed(Original):
        """The same weights (its extra module has none), one more module name."""

        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Identity()

    module = types.ModuleType("refactor_zoo")
    module.Original, module.Refactored, module.Renamed = Original, Refactored, Renamed
    sys.modules["refactor_zoo"] = module
    try:
        path = tmp_path / "original.pt"
        torch.save(Original().state_dict(), path)
        command = [
            "compare",
            str(path),
            str(path),
            "--arch",
            "refactor_zoo:Original",
            "--input-shape",
            "3,8",
            "--arch-b",
        ]
        result = CliRunner().invoke(main, command + ["refactor_zoo:Refactored"])
        renamed = CliRunner().invoke(main, command + ["refactor_zoo:Renamed"])
    finally:
        del sys.modules["refactor_zoo"]
    assert result.exit_code == 0, result.output
    assert "first divergence at act (ReLU)" in result.output and "shape [3, 16] in A, [3, 4] in B" in result.output
    assert renamed.exit_code == 1
    assert (
        renamed.output.startswith("error: the models' module names do not correspond")
        and "only in B: extra" in renamed.output
    )


def test_a_transformers_model_with_dict_outputs():
    """A tiny random GPT-2 (built from a config, nothing downloaded): ModelOutput outputs,
    transformers' Conv1D layers, embeddings; a nudge in the second block's MLP."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    a = transformers.GPT2LMHeadModel(config).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():  # one input feature's row: a nudge of every weight would vanish, as
        b.transformer.h[1].mlp.c_fc.weight[0].add_(1e-3)  # LayerNorm's output sums to 0
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    result = first_divergence(a, b, tokens)
    assert result.first.module == "transformer.h.1.mlp.c_fc" and result.first.module_type == "Conv1D"
    before = result.forward[: result.first.index]
    assert [d.module for d in before][-2:] == ["transformer.h.1.attn", "transformer.h.1.ln_2"]
    assert all(d.exact for d in before)

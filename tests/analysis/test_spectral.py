"""introspect.spectral and ``introspect weights --spectral``: the numbers on matrices whose spectrum
is known by construction, which tensors are analysed, the warning band, the scalars read back."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from introspect import ModelTypeError, SpectralStats, spectral
from introspect.analysis.spectral import (
    ALPHA_BAND,
    SCALARS,
    compare_spectral,
    fit_power_law,
    matrix_spectrum,
    weight_matrices,
)
from introspect.cli.commands import main
from tests.support.events import read_events, scalar_at


def with_eigenvalues(n: int, m: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An ``n × m`` matrix W whose WᵀW has exactly these (min(n, m)) eigenvalues: random
    orthonormal singular vectors around the square roots."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (u * eigenvalues.sqrt()) @ v.T


def pareto_quantiles(count: int, alpha: float, x_min: float = 1.0) -> torch.Tensor:
    """``count`` evenly spaced quantiles of the power law with density ∝ λ^-alpha above x_min."""
    p = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return x_min * (1.0 - p) ** (-1.0 / (alpha - 1.0))


def pareto_draws(count: int, alpha: float, seed: int) -> torch.Tensor:
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u ** (-1.0 / (alpha - 1.0))


# --------------------------------------------------------------------------- alpha
@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0])
def test_alpha_of_a_pure_power_law_spectrum(alpha):
    s = matrix_spectrum("w", with_eigenvalues(600, 400, pareto_quantiles(400, alpha)).float())
    assert abs(s.alpha - alpha) <= 0.3, s
    assert s.tail >= 0.9 * 400  # the whole spectrum is one power law: the fit takes (nearly) all of it


@pytest.mark.parametrize("alpha", [1.5, 2.5, 3.5, 5.0, 7.0])
def test_alpha_of_a_power_law_tail_on_a_bulk(alpha):
    """A trained layer's ESD: a bulk, and a heavy tail above it. The KS search must find where
    the tail starts (150 eigenvalues from 2.0 up) and fit only that."""
    g = torch.Generator().manual_seed(1)
    bulk = torch.rand(250, generator=g, dtype=torch.float64) * 0.9 + 0.1
    s = matrix_spectrum("w", with_eigenvalues(600, 400, torch.cat([bulk, pareto_quantiles(150, alpha, x_min=2.0)])))
    assert abs(s.alpha - alpha) <= 0.3, s
    assert 140 <= s.tail <= 160, s.tail


@pytest.mark.parametrize("alpha", [1.5, 2.0, 2.5, 3.0])
def test_alpha_of_random_power_law_draws(alpha):
    """Eigenvalues drawn at random from the power law (sampling noise: the Hill estimate's
    standard error is (alpha - 1) / sqrt(tail), about 0.1 here), five matrices each."""
    for seed in range(5):
        s = matrix_spectrum("w", with_eigenvalues(600, 400, pareto_draws(400, alpha, seed), seed=seed))
        assert abs(s.alpha - alpha) <= 0.3, (seed, s)


def test_fit_power_law_needs_enough_values():
    alpha, tail, ks = fit_power_law(pareto_quantiles(10, 3.0))
    assert math.isnan(alpha) and tail == 0 and math.isnan(ks)
    alpha, tail, _ = fit_power_law(pareto_quantiles(200, 3.0))
    assert abs(alpha - 3.0) < 0.1 and tail >= 10


def test_warning_band():
    low, high = ALPHA_BAND
    assert (low, high) == (2.0, 6.0)
    over = matrix_spectrum("over", with_eigenvalues(600, 400, pareto_quantiles(400, 1.5)))
    fine = matrix_spectrum("fine", with_eigenvalues(600, 400, pareto_quantiles(400, 3.5)))
    under = matrix_spectrum("under", with_eigenvalues(600, 400, pareto_quantiles(400, 9.0)))
    assert over.alpha < 2 and "over-trained" in over.warning and "< 2" in over.warning
    assert fine.warning == ""
    assert under.alpha > 6 and "under-trained" in under.warning and "> 6" in under.warning
    small = matrix_spectrum("small", torch.randn(8, 8))  # 8 eigenvalues: no fit, no warning
    assert math.isnan(small.alpha) and small.warning == ""


# --------------------------------------------------------------------------- norms and outliers
def test_sigma_max_and_stable_rank_match_the_svd():
    w = torch.randn(50, 80, generator=torch.Generator().manual_seed(0))
    s = matrix_spectrum("w", w)
    sv = torch.linalg.svdvals(w.double())
    assert s.sigma_max == pytest.approx(float(sv[0]), rel=1e-9)
    assert s.stable_rank == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-9)
    assert s.eigenvalues == 50


def test_conv_kernel_is_reshaped_to_out_by_in_k_k():
    conv = nn.Conv2d(16, 32, 3)
    (s,) = spectral(nn.Sequential(conv))
    assert s.name == "0.weight" and s.shape == (32, 16, 3, 3) and s.eigenvalues == 32
    assert s.sigma_max == pytest.approx(
        float(torch.linalg.svdvals(conv.weight.detach().double().reshape(32, -1))[0]), rel=1e-9
    )


@pytest.mark.parametrize("shape", [(300, 200), (512, 512), (1000, 100), (100, 1000)])
def test_marchenko_pastur_outliers(shape):
    """A Gaussian matrix is all bulk; three planted directions well above the BBP threshold are
    exactly three outliers."""
    g = torch.Generator().manual_seed(3)
    for seed in range(3):
        noise = 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        assert matrix_spectrum("g", noise).mp_outliers == 0
    w = torch.randn(*shape, generator=g)
    u = torch.linalg.qr(torch.randn(shape[0], 3, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], 3, generator=g))[0]
    strength = torch.tensor([4.0, 6.0, 8.0]) * math.sqrt(max(shape))
    s = matrix_spectrum("spiked", w + (u * strength) @ v.T)
    assert s.mp_outliers == 3
    assert s.mp_edge == pytest.approx((1 + math.sqrt(min(shape) / max(shape))) ** 2, rel=0.1)  # sigma² = 1


def test_nonfinite_and_zero_matrices_do_not_fail():
    bad = torch.ones(30, 30)
    bad[0, 0] = math.nan
    s = matrix_spectrum("bad", bad)
    assert math.isnan(s.alpha) and math.isnan(s.sigma_max)
    z = matrix_spectrum("zero", torch.zeros(30, 30))
    assert z.sigma_max == 0 and math.isnan(z.alpha) and z.mp_outliers == 0


# --------------------------------------------------------------------------- which tensors
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.conv = nn.Conv1d(16, 16, 3)
        self.attn = nn.MultiheadAttention(16, 2)
        self.lstm = nn.LSTM(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.tied = nn.Linear(4, 16, bias=False)
        self.tied_again = self.tied


def test_which_matrices_of_a_module_and_of_a_state_dict():
    model = Mixed()
    names = list(weight_matrices(model))
    assert names == [
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "head.weight",
        "tied.weight",
    ]  # no embedding, no 1-D tensor, a shared weight once
    from_state = list(weight_matrices(model.state_dict()))
    assert "embed.weight" in from_state and "norm.weight" not in from_state  # a state_dict cannot tell embeddings
    stats = spectral(model)
    assert [s.name for s in stats] == names and all(isinstance(s, SpectralStats) for s in stats)
    assert stats[1].shape == (48, 16)  # the in-projection: q, k and v stacked


def test_bad_argument():
    with pytest.raises(ModelTypeError, match="nn.Module or a state_dict"):
        spectral([torch.ones(3, 3)])


def test_compare_spectral_pairs_by_name():
    a = [matrix_spectrum("x", torch.randn(40, 30)), matrix_spectrum("only_a", torch.randn(40, 30))]
    b = [matrix_spectrum("x", torch.randn(40, 30) * 2), matrix_spectrum("only_b", torch.randn(40, 30))]
    changes = compare_spectral(a, b)
    assert [(c.name, c.a is not None, c.b is not None) for c in changes] == [
        ("x", True, True),
        ("only_a", True, False),
        ("only_b", False, True),
    ]
    assert changes[0].alpha_change == pytest.approx(b[0].alpha - a[0].alpha)
    assert math.isnan(changes[1].alpha_change)


# --------------------------------------------------------------------------- command line
def _heavy_and_random(tmp_path):
    """Two checkpoints of one MLP: A random, B with fc1 given a heavy (alpha 1.5) spectrum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 10))
    a = tmp_path / "a.pt"
    torch.save(model.state_dict(), a)
    with torch.no_grad():
        model[0].weight.copy_(with_eigenvalues(300, 200, pareto_quantiles(200, 1.5)).float())
    b = tmp_path / "b.pt"
    torch.save(model.state_dict(), b)
    return a, b


def test_cli_spectral_one_file_with_scalars(tmp_path):
    _, b = _heavy_and_random(tmp_path)
    logdir = tmp_path / "run"
    result = CliRunner().invoke(main, ["weights", str(b), "--spectral", "--logdir", str(logdir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "matrix", "sigma_max", "stable"]
    row = next(line for line in lines if line.startswith("0.weight"))
    assert "300x200" in row and "1.50" in row and "over-trained" in row
    # 2.weight (10 x 300) has 10 eigenvalues: too few for a tail fit
    assert "2 matrices, 1 with an alpha fit; 1 outside WeightWatcher's 2-6 band" in result.output
    acc = read_events(logdir)
    expected = {f"spectral/{k}/{p}" for k in SCALARS for p in ("0.weight", "2.weight")} - {"spectral/alpha/2.weight"}
    assert expected == {t for t in acc.Tags()["scalars"] if t.startswith("spectral/")}  # no alpha: no point
    assert scalar_at(acc, "spectral/alpha/0.weight", 0) == pytest.approx(1.5, abs=0.05)
    assert scalar_at(acc, "spectral/mp_outliers/2.weight", 0) >= 0


def test_cli_spectral_a_to_b(tmp_path):
    a, b = _heavy_and_random(tmp_path)
    logdir = tmp_path / "run"
    result = CliRunner().invoke(main, ["weights", str(a), str(b), "--spectral", "--logdir", str(logdir)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("0.weight"))
    assert "-> 1.50" in row and "over-trained" in row
    assert "2 matrices, 1 with an alpha fit in both; alpha moved most in 0.weight" in result.output
    acc = read_events(logdir)
    assert [e.step for e in acc.Scalars("spectral/alpha/0.weight")] == [0, 1]


def test_cli_spectral_with_arch_skips_what_is_not_a_matrix(tmp_path):
    from tests.support.saved_models import SEED_ARCH, seed_cnn

    path = tmp_path / "seed.pt"
    torch.save(seed_cnn().state_dict(), path)
    result = CliRunner().invoke(main, ["weights", str(path), "--spectral", "--arch", SEED_ARCH])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()[1:-1]]
    assert names == ["conv1.weight", "conv2.weight", "linear1.weight", "linear2.weight"]  # no bias


def test_cli_spectral_without_matrices_is_an_error(tmp_path):
    path = tmp_path / "vector.pt"
    torch.save({"scale": torch.ones(5)}, path)
    result = CliRunner().invoke(main, ["weights", str(path), "--spectral"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "no weight matrix" in result.output

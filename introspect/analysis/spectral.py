"""Spectral analysis of weight matrices: how trained each layer looks, from its weights alone.

>>> for s in spectral(model):                                     # doctest: +SKIP
...     print(s.name, s.alpha, s.warning)

WeightWatcher (Martin & Mahoney, "Implicit self-regularization in deep neural networks", JMLR
2021) reads a layer's training from the empirical spectral density (ESD) of ``X = WᵀW / N``: a
random matrix has a Marchenko–Pastur bulk, and training grows a heavy power-law tail
``ρ(λ) ~ λ^-α``. It calls α < 2 over-trained (the tail is so heavy that a few directions carry
the layer) and α > 6 under-trained (hardly any tail: the layer is still close to random); well
trained layers sit in 2–6. Nothing here needs data or the training script.

Per matrix (a ``Linear`` weight; a conv kernel reshaped to ``out × in·k·k``; attention and RNN
in-projections; from a bare state_dict, every floating tensor of two or more dimensions):

* ``sigma_max``: the largest singular value (the spectral norm);
* ``stable_rank``: ``‖W‖²_F / σ_max²``, how many directions carry the energy (at most the rank);
* ``alpha``: the power-law exponent of the tail of the eigenvalues of ``WᵀW``, estimated the way
  WeightWatcher (and the ``powerlaw`` package) does, after Clauset, Shalizi & Newman, "Power-law
  distributions in empirical data" (SIAM Review 2009): for every candidate lower bound ``x_min``
  (each eigenvalue, keeping a tail of at least ``MIN_TAIL``), the continuous maximum-likelihood
  (Hill) exponent ``α = 1 + n / Σ ln(λ_i / x_min)`` over the ``n`` eigenvalues ``λ_i ≥ x_min``,
  and the Kolmogorov–Smirnov distance between that tail and the fitted power law; the ``x_min``
  with the smallest distance wins. α is scale-free, so how ``X`` is normalised does not change it;
* ``mp_outliers``: how many eigenvalues of ``X`` lie above the Marchenko–Pastur bulk edge
  ``λ+ = σ²(1 + √(M/N))²`` (``N ≥ M`` the matrix's sides) plus four Tracy–Widom widths (the
  largest eigenvalue of a random matrix wanders past λ+ by about one width, so only what lies
  well beyond it counts). The bulk's σ² is matched to the ESD's median, not to its mean, so a
  few large outliers do not inflate the edge they are measured against.

On the same matrices this α agrees with WeightWatcher 0.7.7's ``analyze()`` to three decimals
(it runs the same search). A freshly initialised layer has a Marchenko–Pastur bulk and no real
tail: its α is large and erratic (3.9 to 40 over a random resnet18), which is what "above 6"
flags; the KS distance says how well any power law fits at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelTypeError
from ..records.sinks import write_step
from ..records.step import HostStep
from ..records.tags import spectral_tag
from ..terminal import escape, format_table, progress

__all__ = [
    "SpectralStats",
    "SpectralChange",
    "ALPHA_BAND",
    "MIN_TAIL",
    "SCALARS",
    "spectral",
    "weight_matrices",
    "matrix_spectrum",
    "fit_power_law",
    "compare_spectral",
    "format_spectral",
    "format_spectral_changes",
    "write_spectral_scalars",
]

ALPHA_BAND = (2.0, 6.0)
"""WeightWatcher's band of well-trained layers: α below it is over-trained, above it under-trained."""

MIN_TAIL = 10
"""The fewest eigenvalues a tail fit uses. Clauset's search, left free, can pick a tail of two or
three eigenvalues whose distance to any power law is tiny and whose exponent means nothing."""

MIN_EIGENVALUES = 2 * MIN_TAIL
"""A matrix with fewer non-zero eigenvalues gets no α (its ``alpha`` is NaN)."""

SCALARS = ("alpha", "stable_rank", "sigma_max", "mp_outliers")
"""What ``write_spectral_scalars`` writes, as ``spectral/{scalar}/{param}``."""

TRACY_WIDOM_WIDTHS = 4.0
"""How far past λ+ (in Tracy–Widom widths) an eigenvalue must lie to count as an outlier: the
largest eigenvalue of a random matrix exceeds λ+ + 4 widths with a probability below 1e-4."""

_ZERO = 1e-10
"""Eigenvalues below this share of the largest are numerical zeros (a rank-deficient matrix)."""

_SKIPPED_MODULES = (nn.Embedding, nn.EmbeddingBag)
"""Lookup tables, not operators on a signal: their rows are read one at a time, never multiplied."""


@dataclass(frozen=True)
class SpectralStats:
    """One matrix's spectrum. ``alpha`` is NaN when the matrix is too small to fit a tail."""

    name: str
    shape: tuple[int, ...]
    """The tensor's own shape; the matrix analysed is ``shape[0] × prod(shape[1:])``."""
    sigma_max: float
    stable_rank: float
    alpha: float
    tail: int
    """How many of the largest eigenvalues the power-law fit used (0: no fit)."""
    ks_distance: float
    """Kolmogorov–Smirnov distance of the tail to the fitted power law (small: a good fit)."""
    eigenvalues: int
    mp_edge: float
    """The Marchenko–Pastur bulk edge λ+ of ``X = WᵀW / N``, for the bulk's own σ²."""
    mp_outliers: int

    @property
    def warning(self) -> str:
        """WeightWatcher's reading of α outside its 2–6 band, or "" inside it (or with no α)."""
        low, high = ALPHA_BAND
        if self.alpha < low:
            return f"alpha {self.alpha:.2f} < {low:g}: over-trained (a few directions dominate the layer)"
        if self.alpha > high:
            return f"alpha {self.alpha:.2f} > {high:g}: under-trained (still close to a random matrix)"
        return ""


@dataclass(frozen=True)
class SpectralChange:
    """One matrix in two checkpoints (None where a checkpoint lacks it)."""

    name: str
    a: SpectralStats | None
    b: SpectralStats | None

    @property
    def alpha_change(self) -> float:
        return self.b.alpha - self.a.alpha if self.a is not None and self.b is not None else math.nan


# --------------------------------------------------------------------------- the matrices
def weight_matrices(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors ``spectral`` analyses, as they are (reshaped later, one at a time).

    A module gives every parameter of two or more dimensions of every submodule but embeddings
    (each shared parameter once); a state_dict gives every floating tensor of two or more
    dimensions (it does not say which ones are embeddings).
    """
    if isinstance(model_or_state_dict, nn.Module):
        from ..runtime.selection import unwrap_model

        found: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for module_name, module in unwrap_model(model_or_state_dict).named_modules():
            if isinstance(module, _SKIPPED_MODULES):
                continue
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() >= 2 and param.is_floating_point() and id(param) not in seen and not _lazy(param):
                    seen.add(id(param))
                    found[f"{module_name}.{param_name}" if module_name else param_name] = param.detach()
        return found
    if isinstance(model_or_state_dict, Mapping):
        return {
            str(k): v.detach()
            for k, v in model_or_state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2
        }
    raise ModelTypeError(
        f"spectral() takes an nn.Module or a state_dict (a mapping of names to tensors), got {type(model_or_state_dict).__name__}"
    )


def _lazy(param: torch.Tensor) -> bool:
    return isinstance(param, nn.parameter.UninitializedParameter)


# --------------------------------------------------------------------------- one matrix
def spectral(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], show_progress: bool = False
) -> list[SpectralStats]:
    """σ_max, stable rank, power-law α and Marchenko–Pastur outliers of every weight matrix.

    >>> stats = spectral(torchvision.models.resnet18())              # doctest: +SKIP
    >>> [s.name for s in stats if s.warning]                          # doctest: +SKIP

    Args:
        model_or_state_dict: a module (its Linear, conv, attention and RNN weights) or a
            state_dict (every floating tensor of two or more dimensions).
        show_progress: a progress bar on stderr (for the command line).

    Raises:
        ModelTypeError: neither a module nor a mapping.
    """
    matrices = weight_matrices(model_or_state_dict)
    return [
        matrix_spectrum(name, t)
        for name, t in progress(matrices.items(), show_progress, total=len(matrices), desc="spectra", unit="matrix")
    ]


def matrix_spectrum(name: str, weight: torch.Tensor) -> SpectralStats:
    """The spectrum of one tensor, reshaped to ``shape[0] × prod(shape[1:])``."""
    shape = tuple(weight.shape)
    w = weight.detach().reshape(shape[0], -1).to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()):
        nan = math.nan
        return SpectralStats(name, shape, nan, nan, nan, 0, nan, 0, nan, 0)
    n_big, m_small = max(w.shape), min(w.shape)
    # The eigenvalues of WᵀW are those of the smaller Gram matrix: m³ work instead of an SVD of
    # the whole matrix. float64 keeps the small ones (the bulk) well above rounding.
    gram = w.T @ w if w.shape[1] == m_small else w @ w.T
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0).numpy()[::-1]  # descending
    top = float(eig[0]) if eig.size else 0.0
    frobenius2 = float(eig.sum())
    if top <= 0:
        return SpectralStats(name, shape, 0.0, 0.0, math.nan, 0, math.nan, int(eig.size), 0.0, 0)
    nonzero = eig[eig > top * _ZERO]
    alpha, tail, ks = fit_power_law(nonzero)
    x = eig / n_big  # X = WᵀW / N: the normalisation Marchenko–Pastur is stated in
    edge, threshold = _mp_edge(x, n_big, m_small)
    return SpectralStats(
        name=name,
        shape=shape,
        sigma_max=math.sqrt(top),
        stable_rank=frobenius2 / top,
        alpha=alpha,
        tail=tail,
        ks_distance=ks,
        eigenvalues=int(eig.size),
        mp_edge=edge,
        mp_outliers=int((x > threshold).sum()),
    )


def fit_power_law(eigenvalues: np.ndarray | Sequence[float], min_tail: int = MIN_TAIL) -> tuple[float, int, float]:
    """``(alpha, tail size, KS distance)`` of the power-law tail of positive values (Clauset's method).

    Every value is tried as ``x_min`` (keeping at least ``min_tail`` values above it); each gets
    the Hill/maximum-likelihood exponent of the values at or above it, and the one whose tail is
    closest to its fitted power law (Kolmogorov–Smirnov) wins. ``(nan, 0, nan)`` with fewer than
    ``MIN_EIGENVALUES`` values.
    """
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]  # descending: x[:k] is a tail
    x = x[x > 0]
    n = x.size
    if n < max(MIN_EIGENVALUES, min_tail):
        return math.nan, 0, math.nan
    logs = np.log(x)
    cumulative = np.cumsum(logs)
    best = (math.inf, math.nan, 0)
    for k in range(min_tail, n + 1):  # the tail is x[:k], its x_min = x[k-1]
        log_min = logs[k - 1]
        spread = cumulative[k - 1] - k * log_min
        if spread <= 0:  # every tail value equal: no exponent
            continue
        alpha = 1.0 + k / spread
        # The tail ascending against the fitted CDF F(x) = 1 - (x / x_min)^(1 - α); the empirical
        # CDF at the i-th smallest is i / k (the same convention as WeightWatcher's and powerlaw's).
        ascending = logs[k - 1 :: -1] - log_min
        fitted = 1.0 - np.exp((1.0 - alpha) * ascending)
        distance = float(np.max(np.abs(fitted - np.arange(k) / k)))
        if distance < best[0]:
            best = (distance, alpha, k)
    distance, alpha, k = best
    return (float(alpha), int(k), float(distance)) if k else (math.nan, 0, math.nan)


# --------------------------------------------------------------------------- Marchenko–Pastur
def _mp_edge(x: np.ndarray, n: int, m: int) -> tuple[float, float]:
    """``(λ+, outlier threshold)`` for eigenvalues ``x`` of ``WᵀW / N``, ``W`` being ``N × M``."""
    y = m / n
    sigma2 = float(np.median(x)) / _mp_median(round(y, 6))
    edge = sigma2 * (1.0 + math.sqrt(y)) ** 2
    # Johnstone (2001): the largest eigenvalue of an N×M white Wishart matrix sits at
    # (√(N-1) + √M)² with Tracy–Widom width (√(N-1) + √M)(1/√(N-1) + 1/√M)^(1/3).
    a, b = math.sqrt(max(n - 1, 1)), math.sqrt(m)
    centre = (a + b) ** 2 / n
    width = (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0) / n
    return edge, sigma2 * (centre + TRACY_WIDOM_WIDTHS * width)


@lru_cache(maxsize=256)
def _mp_median(y: float) -> float:
    """The median of the Marchenko–Pastur law of ratio ``y = M/N ≤ 1`` and unit variance.

    Integrated numerically after ``x = λ- + (λ+ - λ-)(1 - cos θ)/2``, which turns the density's
    square-root edges into a smooth integrand.
    """
    lo, hi = (1.0 - math.sqrt(y)) ** 2, (1.0 + math.sqrt(y)) ** 2
    theta = np.linspace(0.0, math.pi, 4097)
    x = lo + (hi - lo) * (1.0 - np.cos(theta)) / 2.0
    half = (hi - lo) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = np.where(x > 0, (half * np.sin(theta)) ** 2 / (2.0 * math.pi * y * x), 0.0)
    if y == 1.0:  # at x = 0 the ratio sin²θ / x tends to 1/4 (x ≈ θ², sin²θ ≈ θ²)
        integrand[0] = half**2 / (8.0 * math.pi)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2.0 * np.diff(theta))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, x))


# --------------------------------------------------------------------------- two checkpoints
def compare_spectral(a: Sequence[SpectralStats], b: Sequence[SpectralStats]) -> list[SpectralChange]:
    """Pair the matrices of two checkpoints by name: A's order, then those only in B."""
    by_name = {s.name: s for s in b}
    names_a = {s.name for s in a}
    return [SpectralChange(s.name, s, by_name.get(s.name)) for s in a] + [
        SpectralChange(s.name, None, s) for s in b if s.name not in names_a
    ]


# --------------------------------------------------------------------------- output
def _fixed(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def format_spectral(stats: Sequence[SpectralStats]) -> str:
    """The terminal table, then one line counting the layers outside WeightWatcher's band."""
    rows = [
        [
            s.name,
            "x".join(map(str, (s.shape[0], math.prod(s.shape[1:])))),
            s.sigma_max,
            s.stable_rank,
            _fixed(s.alpha),
            str(s.tail),
            str(s.mp_outliers),
            s.warning,
        ]
        for s in stats
    ]
    table = format_table(
        ["name", "matrix", "sigma_max", "stable rank", "alpha", "tail", "MP outliers", "warning"],
        rows,
        right=[False, False, True, True, True, True, True, False],
    )
    fitted = [s for s in stats if not math.isnan(s.alpha)]
    flagged = [s for s in fitted if s.warning]
    low, high = ALPHA_BAND
    line = f"{len(stats)} matrices, {len(fitted)} with an alpha fit; {len(flagged)} outside WeightWatcher's {low:g}-{high:g} band"
    if fitted:
        line += f"; mean alpha {sum(s.alpha for s in fitted) / len(fitted):.2f}"
    return f"{table}\n{line}"


def format_spectral_changes(changes: Sequence[SpectralChange]) -> str:
    """The A -> B table: alpha, stable rank, σ_max and outliers in each checkpoint."""

    def pair(get: Any, c: SpectralChange, digits: int = 2) -> str:
        a = _fixed(get(c.a), digits) if c.a is not None else "—"
        b = _fixed(get(c.b), digits) if c.b is not None else "—"
        return f"{a} -> {b}"

    rows = []
    for c in changes:
        note = "only in A" if c.b is None else "only in B" if c.a is None else c.b.warning
        rows.append(
            [
                c.name,
                pair(lambda s: s.alpha, c),
                _fixed(c.alpha_change),
                pair(lambda s: s.stable_rank, c),
                pair(lambda s: s.sigma_max, c, 3),
                pair(lambda s: float(s.mp_outliers), c, 0),
                note,
            ]
        )
    table = format_table(
        [
            "name",
            "alpha A -> B",
            "change",
            "stable rank A -> B",
            "sigma_max A -> B",
            "MP outliers A -> B",
            "warning in B",
        ],
        rows,
        right=[False, True, True, True, True, True, False],
    )
    moved = [c for c in changes if not math.isnan(c.alpha_change)]
    line = f"{len(changes)} matrices, {len(moved)} with an alpha fit in both"
    if moved:
        top = max(moved, key=lambda c: abs(c.alpha_change))
        line += f"; alpha moved most in {escape(top.name)} ({top.alpha_change:+.2f})"
    return f"{table}\n{line}"


def write_spectral_scalars(writer: Any, stats: Sequence[SpectralStats], step: int = 0) -> None:
    """``spectral/{alpha,stable_rank,sigma_max,mp_outliers}/{param}`` at ``step``, as one event
    (an undefined α is left out, as TensorBoard draws no NaN)."""
    scalars = {spectral_tag(key, s.name): float(getattr(s, key)) for s in stats for key in SCALARS}
    write_step(writer, HostStep(step=step, histograms={}, scalars=scalars, measures={}))

"""Range estimators: pure functions from statistics to a clipping range per row.

Each returns ``(lo, hi)`` float64 tensors of shape ``[rows]``; :func:`fewbits.observe.methods.
estimate_range` puts them in the qparam shape. Histogram-based estimators read
:class:`~.stats.HistogramStats` or, for weights, :class:`~.stats.SampleStats` (the values
themselves). For symmetric grids clipping is about zero (``|x| ≤ α``).
"""
from __future__ import annotations

import math

import torch

from ..spec import QuantSpec
from .stats import HistogramStats, MovingAverageStats, RangeStats, SampleStats


def minmax(stats: RangeStats, spec: QuantSpec | None = None):
    """The observed minimum and maximum."""
    return stats.min, stats.max


def ema(stats: MovingAverageStats, spec: QuantSpec | None = None):
    """The moving averages of per-batch minimum and maximum."""
    if not isinstance(stats, MovingAverageStats):
        raise ValueError(f"'ema' needs moving-average statistics (MovingAverageObserver), got {type(stats).__name__}")
    return stats.min, stats.max


def _need_distribution(stats, method: str) -> None:
    if not isinstance(stats, (HistogramStats, SampleStats)):
        raise ValueError(
            f"'{method}' needs a value distribution (HistogramObserver or sample_stats), "
            f"got {type(stats).__name__}"
        )


def _clip(stats: RangeStats, alpha: torch.Tensor, center: torch.Tensor | float = 0.0):
    """The range ``[center − α, center + α]`` intersected with the observed one."""
    lo = torch.maximum(stats.min, center - alpha)
    hi = torch.minimum(stats.max, center + alpha)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _inverse_cdf(stats: HistogramStats, mass: torch.Tensor) -> torch.Tensor:
    """Value below which ``mass`` [R] of the counts lie, linear inside a bin."""
    edges = stats.edges()
    cdf = torch.cat([torch.zeros_like(stats.counts[:, :1]), stats.counts.cumsum(1)], dim=1)
    target = mass.unsqueeze(1)
    hi_idx = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(1, cdf.shape[1] - 1)
    lo_idx = hi_idx - 1
    c0, c1 = cdf.gather(1, lo_idx), cdf.gather(1, hi_idx)
    e0, e1 = edges.gather(1, lo_idx), edges.gather(1, hi_idx)
    frac = torch.where(c1 > c0, (target - c0) / (c1 - c0).clamp_min(1e-300), torch.zeros_like(c0))
    return (e0 + frac * (e1 - e0)).squeeze(1)


def _histogram_quantile(stats: HistogramStats, q: float) -> torch.Tensor:
    """``torch.quantile``'s linear convention on a histogram, within one bin of the exact value.

    The exact quantile interpolates order statistics ``k`` and ``k + 1`` at rank
    ``r = (n − 1)·q``; each is located inside its own bin (the middle of its unit of mass), so
    the interpolation of the two is off by at most one bin width, even in sparse tails.
    """
    n = stats.counts.sum(1)
    rank = (n - 1).clamp_min(0) * q
    k = rank.floor()
    v0 = _inverse_cdf(stats, k + 0.5)
    v1 = _inverse_cdf(stats, torch.minimum(k + 1, (n - 1).clamp_min(0)) + 0.5)
    return (v0 + (rank - k) * (v1 - v0)).clamp(stats.min, stats.max)


def abs_histogram(stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of ``|x|`` per row: counts [R, L] on uniform bins from 0, and bin widths [R].

    The dyadic lattice is symmetric about zero (cell ``c`` mirrors to ``−c − 1``), so folding a
    :class:`HistogramStats` is exact. Sample statistics are binned into 2048 bins up to max|x|.
    """
    if isinstance(stats, HistogramStats):
        bins = stats.bins
        cells = stats.origin[:, None] + torch.arange(bins)[None, :]
        folded = torch.where(cells >= 0, cells, -cells - 1)
        counts = torch.zeros(stats.counts.shape[0], bins + 1, dtype=torch.float64)
        counts.scatter_add_(1, folded.clamp(0, bins), stats.counts)
        return counts, torch.ldexp(torch.ones_like(stats.min), stats.level.to(torch.float64))
    values = stats.values.abs()
    bins = 2048
    width = values.amax(1).clamp_min(1e-30) / bins
    idx = (values / width[:, None]).floor().to(torch.int64).clamp(0, bins - 1)
    counts = torch.zeros(values.shape[0], bins, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(values))
    return counts, width


def percentile(stats, spec: QuantSpec | None = None, q: float = 99.99):
    """Clip at the ``q``-th percentile: of ``|x|`` for symmetric grids, of each tail otherwise."""
    _need_distribution(stats, "percentile")
    if not 0 < q <= 100:
        raise ValueError(f"percentile q must be in (0, 100], got {q}")
    symmetric = spec is not None and spec.symmetric
    if isinstance(stats, SampleStats):
        if symmetric:
            return _clip(stats, torch.quantile(stats.values.abs(), q / 100, dim=1))
        return (torch.quantile(stats.values, 1 - q / 100, dim=1), torch.quantile(stats.values, q / 100, dim=1))
    if symmetric:
        counts, width = abs_histogram(stats)
        folded = HistogramStats(torch.zeros_like(stats.min), torch.maximum(-stats.min, stats.max),
                                stats.qshape, counts, torch.zeros_like(stats.origin),
                                torch.log2(width).round().to(torch.int64))
        return _clip(stats, _histogram_quantile(folded, q / 100))
    return _histogram_quantile(stats, 1 - q / 100), _histogram_quantile(stats, q / 100)


def _levels(spec: QuantSpec) -> int:
    return spec.qmax - spec.qmin


def one_sided(stats: RangeStats, spec: QuantSpec) -> torch.Tensor:
    """Per row: an asymmetric grid on data of one sign spends all its levels on that side."""
    return (not spec.symmetric) & ((stats.min >= 0) | (stats.max <= 0))


def aciq_clip_ratio(bits: int, prior: str = "laplace") -> float:
    """Optimal clip α / (Laplace b or Gaussian σ) for a ``bits``-bit uniform grid over [−α, α].

    Banner, Nahshan, Soudry, "Post-training 4-bit quantization of convolution networks for
    rapid-deployment", NeurIPS 2019. With rounding noise ``Δ²/12 = α² / (3·4^M)`` the expected
    error is ``2b²·e^(−α/b) + α²/(3·4^M)`` (Laplace) or
    ``2σ²[(1 + t²)(1 − Φ(t)) − t·φ(t)] + α²/(3·4^M)``, ``t = α/σ`` (Gaussian); setting its
    derivative to zero gives a monotone equation in α, solved here by bisection to 1e-12.

    >>> round(aciq_clip_ratio(4, "laplace"), 2), round(aciq_clip_ratio(4, "gaussian"), 2)
    (5.03, 2.56)
    """
    noise = 1.0 / (3 * 4.0**bits)
    if prior == "laplace":
        def slope(a):  # d/dα of the error, halved, for b = 1
            return a * noise - math.exp(-a)
    elif prior == "gaussian":
        def slope(a):
            pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
            tail = 0.5 * math.erfc(a / math.sqrt(2))
            return a * noise - 2 * (pdf - a * tail)
    else:
        raise ValueError(f"aciq prior must be 'laplace' or 'gaussian', got {prior!r}")
    lo, hi = 0.0, 200.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def aciq(stats, spec: QuantSpec, prior: str = "laplace"):
    """ACIQ: fit the prior (Laplace ``b = E|x − μ|`` or Gaussian σ) and clip at ``μ ± ratio·b``.

    Symmetric grids centre on 0 (μ = 0); the number of bits is that of the whole grid.
    """
    _need_distribution(stats, "aciq")
    values, weights = stats.weighted_samples()
    total = weights.sum(1)
    mu = (values * weights).sum(1) / total
    if spec.symmetric:
        mu = torch.zeros_like(mu)
    dev = values - mu[:, None]
    if prior == "laplace":
        spread = (dev.abs() * weights).sum(1) / total
    else:
        spread = ((dev**2 * weights).sum(1) / total).sqrt()
    bits = math.log2(_levels(spec) + 1)
    return _clip(stats, aciq_clip_ratio(round(bits), prior) * spread, mu)


def octav(stats, spec: QuantSpec, iterations: int = 50, tol: float = 1e-7):
    """OCTAV: the MSE-optimal clip by the Newton–Raphson fixed point of Sakr et al., ICML 2022.

    ``s ← E[|x|·1{|x|>s}] / (κ·P(|x| ≤ s) + P(|x| > s))`` with rounding noise ``κ·s²``:
    ``κ = 1/(12·L²)`` for ``L`` steps between 0 and ``s`` — ``(qmax − qmin)/2`` on a grid that
    spans both signs, ``qmax − qmin`` when the data and grid are one-sided (unsigned).
    """
    _need_distribution(stats, "octav")
    values, weights = stats.weighted_samples()
    mags = values.abs()
    steps = torch.where(one_sided(stats, spec), float(_levels(spec)), _levels(spec) / 2.0)
    kappa = 1.0 / (12 * steps**2)
    total = weights.sum(1)
    s = (mags * weights).sum(1) / total  # start at the mean magnitude: always inside the data
    for _ in range(iterations):
        outside = (mags > s[:, None]).to(torch.float64) * weights
        tail_mass = outside.sum(1) / total
        numer = (mags * outside).sum(1) / total
        new = numer / (kappa * (1 - tail_mass) + tail_mass).clamp_min(1e-300)
        new = torch.where(numer > 0, new, s)  # nothing beyond s: keep it (cannot clip less than the max)
        converged = ((new - s).abs() <= tol * s.abs().clamp_min(1e-300)).all()
        s = new
        if converged:
            break
    amax = torch.maximum(-stats.min, stats.max)
    return _clip(stats, torch.minimum(s, amax))

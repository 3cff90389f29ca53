"""Search-based range estimators: MSE-optimal clipping and KL/entropy (TensorRT)."""
from __future__ import annotations

import math

import torch

from ..numerics.affine import choose_qparams
from ..spec import QuantSpec
from .estimators import _clip, _need_distribution, abs_histogram, one_sided

_CHUNK_ELEMENTS = 1 << 20  # rows·candidates·samples at once: temporaries stay in cache, not in page faults
_GOLDEN = (math.sqrt(5) - 1) / 2


def _base_range(stats, spec: QuantSpec):
    """The full range every candidate shrinks: ``[−amax, amax]`` when symmetric."""
    if spec.symmetric:
        amax = torch.maximum(-stats.min, stats.max)
        return -amax, amax
    return stats.min, stats.max


def lp_error(values, weights, lo, hi, spec: QuantSpec, p: float) -> torch.Tensor:
    """``Σ w·|x − Q(x)|^p`` of the grid chosen for ``[lo, hi]`` (shapes [R, G]) on samples [R, N].

    Q rounds to nearest with the qparams :func:`~fewbits.choose_qparams` would pick, so the
    search scores exactly the grid that will be used. The error of each sample is taken in
    float32, like the quantizer itself; sums are float64.
    """
    scale, zp = choose_qparams(lo.to(torch.float32), hi.to(torch.float32), spec)
    s, z = scale[..., None], zp.to(torch.float32)[..., None]
    x = values.to(torch.float32)[:, None, :]
    q = (torch.round(x * torch.reciprocal(s)) + z).clamp_(spec.qmin, spec.qmax)
    err = (x - (q - z) * s).abs_()
    err = err.square_() if p == 2 else err.pow_(p)
    return (err * weights.to(torch.float32)[:, None, :]).sum(-1, dtype=torch.float64)


def _search_rows(values, weights, lo0, hi0, spec, p, grid, refine):
    """Grid over the shrink factor t ∈ (0, 1], then golden-section refinement around the best."""
    t = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    ts = t[None, :].expand(values.shape[0], -1)
    step = max(1, _CHUNK_ELEMENTS // values.numel())
    err = torch.cat([lp_error(values, weights, lo0[:, None] * ts[:, i:i + step], hi0[:, None] * ts[:, i:i + step], spec, p)
                     for i in range(0, grid, step)], dim=1)
    best_err, best = err.min(1)
    best_t = t[best]
    a, b = (best_t - 1 / grid).clamp_min(1e-6), (best_t + 1 / grid).clamp_max(1.0)

    def score(tt):
        return lp_error(values, weights, (lo0 * tt)[:, None], (hi0 * tt)[:, None], spec, p)[:, 0]

    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = score(c), score(d)
    for _ in range(refine):
        left = fc < fd
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c, d = torch.where(left, b - _GOLDEN * (b - a), d), torch.where(left, c, a + _GOLDEN * (b - a))
        fc, fd = torch.where(left, score(c), fd), torch.where(left, fc, score(d))
    for cand, f in ((c, fc), (d, fd)):
        better = f < best_err
        best_t, best_err = torch.where(better, cand, best_t), torch.where(better, f, best_err)
    return lo0 * best_t, hi0 * best_t


def mse(stats, spec: QuantSpec, p: float = 2.0, grid: int = 100, refine: int = 20):
    """Clip that minimises the L_p quantization error ``E|x − Q(x)|^p``.

    Candidates shrink the observed range by ``t ∈ (0, 1]`` (both ends together; about zero for
    symmetric grids): a grid of ``grid`` values, then ``refine`` golden-section steps in the
    bracket around the best. The error is evaluated with the real grid (round to nearest,
    clamp), on the values themselves or on the histogram spread uniformly inside each bin.
    """
    _need_distribution(stats, "mse")
    if p <= 0:
        raise ValueError(f"mse p must be positive, got {p}")
    values, weights = stats.weighted_samples()
    lo0, hi0 = _base_range(stats, spec)
    per_row = grid * values.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // per_row)
    parts = [
        _search_rows(values[i:i + chunk], weights[i:i + chunk], lo0[i:i + chunk], hi0[i:i + chunk],
                     spec, p, grid, refine)
        for i in range(0, values.shape[0], chunk)
    ]
    return torch.cat([lo for lo, _ in parts]), torch.cat([hi for _, hi in parts])


def kl_candidates(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P‖Q) for every candidate bin count ``i ∈ [levels, n]`` (TensorRT's entropy calibration).

    P: the first ``i`` bins with all outlier mass added to bin ``i − 1``. Q: the first ``i`` bins
    merged into ``levels`` groups of ``i // levels`` bins (the last group takes the remainder)
    and spread back evenly over the bins of each group where P is non-zero. Both normalised;
    ``q`` is floored at 1e-12 where P has mass that Q lost.

    Within a group ``q`` is constant, so ``Σ p·log q`` is a per-group sum and every term comes
    from prefix sums of ``h``, ``[h > 0]`` and ``h·log h``: O(levels) per candidate instead of
    O(n), exactly the same quantity.
    """
    h = hist.to(torch.float64)
    n = h.shape[0]
    zero = h.new_zeros(1)
    c_h = torch.cat([zero, h.cumsum(0)])
    c_nz = torch.cat([zero, (h > 0).to(h.dtype).cumsum(0)])
    c_hlogh = torch.cat([zero, torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), 0.0).cumsum(0)])
    total = c_h[-1]
    i = torch.arange(levels, n + 1)
    width = (i // levels)[:, None]
    g = torch.arange(levels)[None, :]
    start = g * width
    end = torch.where(g == levels - 1, i[:, None], start + width)
    outliers = total - c_h[i]  # mass beyond the candidate threshold
    last_h = h[i - 1]
    last_p = last_h + outliers
    is_last = g == levels - 1
    group_h = c_h[end] - c_h[start]  # Q's group sums (no outliers)
    group_p = group_h + torch.where(is_last, outliers[:, None], 0.0)
    group_nz = c_nz[end] - c_nz[start] + torch.where(is_last, ((last_h == 0) & (outliers > 0)).to(h.dtype)[:, None], 0.0)
    sum_plogp = c_hlogh[i - 1] + torch.where(last_p > 0, last_p * torch.log(last_p.clamp_min(1e-300)), 0.0)
    q_hat = (group_h / group_nz.clamp_min(1) / c_h[i][:, None].clamp_min(1e-300)).clamp_min(1e-12)
    sum_plogq = torch.where(group_p > 0, group_p * torch.log(q_hat), 0.0).sum(1)
    # KL = Σ p̂ log p̂ − Σ p̂ log q̂ with p̂ = p / total
    return (sum_plogp / total - torch.log(total)) - sum_plogq / total


def entropy(stats, spec: QuantSpec):
    """Clip minimising KL divergence between the ``|x|`` histogram and its quantized version.

    TensorRT's calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017): thresholds
    are tried at every bin edge from ``levels`` bins up to the maximum, where ``levels`` is
    the number of grid steps available between 0 and the threshold.
    """
    _need_distribution(stats, "entropy")
    counts, width = abs_histogram(stats)
    single_side = one_sided(stats, spec)
    alphas = []
    for r in range(counts.shape[0]):
        hist = counts[r]
        nonzero = torch.nonzero(hist).flatten()
        n = int(nonzero[-1]) + 1 if nonzero.numel() else 1
        levels = (spec.qmax - spec.qmin + 1) // (1 if single_side[r] else 2)
        if n <= levels:  # the grid is finer than the histogram: nothing to gain by clipping
            alphas.append(float(n) * float(width[r]))
            continue
        kl = kl_candidates(hist[:n], max(levels, 2))
        alphas.append(float(levels + int(torch.argmin(kl))) * float(width[r]))
    alpha = torch.tensor(alphas, dtype=torch.float64)
    return _clip(stats, torch.minimum(alpha, torch.maximum(-stats.min, stats.max)))

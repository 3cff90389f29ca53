"""Non-uniform grids: sorted real levels per group, values stored as level indices.

A grid is ``levels [G, K]`` (sorted along K) and ``boundaries [G, K-1]``: a value ``x`` of
group ``g`` gets index ``#{boundaries[g] ≤ x}`` and decodes to ``levels[g, index]``. Nearest-level
grids use the midpoints between levels as boundaries; TWN's ternary grid uses ``±Δ``. Ties go
to the upper level, so ``sign(0) = +1`` as in the XNOR kernel's bit (``x ≥ 0``).

Groups are the rows of a 2-D view: one row (per tensor) or one per output channel.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from ..spec import APoTSpec, BinarySpec, CodebookSpec, LevelSpec, PerTensor, Pow2Spec, TernarySpec


def groups_view(x: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """``x`` as ``[G, N]``: one row per tensor or per output channel (dim 0)."""
    return x.reshape(1, -1) if isinstance(spec.granularity, PerTensor) else x.reshape(x.shape[0], -1)


def pow2_magnitudes(bits: int) -> torch.Tensor:
    """``[0, 2^-(n-1), …, 1/2, 1]`` with ``n = 2^(bits-1) − 1`` powers: with the sign, ``2^bits − 1``
    codes (one unused, as in a narrow-range integer grid)."""
    n = 2 ** (bits - 1) - 1
    return torch.cat([torch.zeros(1, dtype=torch.float64), 2.0 ** -torch.arange(n - 1, -1, -1, dtype=torch.float64)])


def apot_terms(bits: int) -> list[list[int]]:
    """The exponents each APoT term may take (besides "absent"): ``bits − 1`` magnitude bits
    split into ``n = ⌈(bits−1)/2⌉`` terms of 2 bits (the last of 1 bit when odd); term ``i``
    takes ``2^-(i + j·n)``, ``j = 0 … 2^(its bits) − 2`` (Li et al. 2020, eq. 5)."""
    m = bits - 1
    n = (m + 1) // 2
    widths = [2] * (m // 2) + [1] * (m % 2)
    return [[i + j * n for j in range(2 ** k - 1)] for i, k in enumerate(widths)]


def apot_magnitudes(bits: int) -> torch.Tensor:
    """Every sum of one choice per term, normalised to a largest level of 1 (``2^(bits-1)``
    distinct magnitudes: the exponents differ between terms, so no two sums coincide)."""
    choices = [[0.0] + [2.0 ** -e for e in exps] for exps in apot_terms(bits)]
    sums = sorted({sum(c) for c in itertools.product(*choices)})
    mags = torch.tensor(sums, dtype=torch.float64)
    return mags / mags.max()


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    return (levels[:, 1:] + levels[:, :-1]) / 2


def _signed(alpha: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """``α · [−mags reversed (no 0), mags]`` per group: sorted levels with one zero."""
    both = torch.cat([-mags[1:].flip(0), mags]).to(alpha.dtype)
    return alpha[:, None] * both[None, :]


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lloyd's k-means of each row of ``values [G, N]`` (only where ``mask``), ``k`` centroids
    initialised evenly from the row's min to max — Deep Compression's "linear" initialisation,
    which keeps the few large weights their own centroids. In one dimension the centroids stay
    sorted; an empty cluster moves to the worst-fitted value (while there are more distinct values
    than filled clusters). Stops early once no assignment changes."""
    x = values.detach().double()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    big = torch.finfo(torch.float64).max
    lo = torch.where(m, x, big).amin(1)
    hi = torch.where(m, x, -big).amax(1)
    empty = ~m.any(1)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    steps = torch.linspace(0, 1, k, dtype=torch.float64)
    centroids = lo[:, None] + (hi - lo)[:, None] * steps[None, :]
    weight = m.double()
    previous = None
    for _ in range(iterations):
        idx = torch.searchsorted(midpoints(centroids).contiguous(), x.contiguous(), right=True)
        if previous is not None and torch.equal(idx, previous):
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, idx, x * weight)
        counts = torch.zeros_like(centroids).scatter_add_(1, idx, weight)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        previous = idx if not _reseed_empty(centroids, counts, x, idx, m) else None
        centroids = centroids.sort(1).values
    return centroids


def _reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                  mask: torch.Tensor) -> bool:
    """Move each empty cluster onto the value its centroid fits worst (in place): linear
    initialisation leaves clusters empty between outliers, and an empty one is a wasted code."""
    moved = False
    for g in torch.nonzero((counts == 0).any(1) & (counts > 0).sum(1).lt(mask.sum(1))).flatten().tolist():
        error = torch.where(mask[g], (x[g] - centroids[g, idx[g]]) ** 2, -1.0)
        for j in torch.nonzero(counts[g] == 0).flatten().tolist():
            worst = int(error.argmax())
            if error[worst] <= 0:
                break
            centroids[g, j], error[worst] = x[g, worst], -1.0
            moved = True
    return moved


def choose_levels(x: torch.Tensor, spec: LevelSpec,
                  mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels, boundaries)`` of ``spec`` fitted to ``x`` (any shape; grouped by
    :func:`groups_view`), float32. ``mask`` (k-means only): the values that count."""
    w = groups_view(x.detach(), spec).double()
    amax = w.abs().amax(1)
    if isinstance(spec, Pow2Spec):
        levels = _signed(amax, pow2_magnitudes(spec.bits))
    elif isinstance(spec, APoTSpec):
        levels = _signed(amax, apot_magnitudes(spec.bits))
    elif isinstance(spec, CodebookSpec):
        levels = kmeans_1d(w, 2 ** spec.bits, spec.iterations,
                           None if mask is None else groups_view(mask, spec))
    elif isinstance(spec, BinarySpec):
        alpha = w.abs().mean(1) if spec.scaled else torch.ones_like(amax)
        levels = torch.stack([-alpha, alpha], 1)
        return levels.float(), torch.zeros_like(alpha)[:, None].float()
    elif isinstance(spec, TernarySpec):
        levels, delta = ternary_levels(w, spec)
        return levels.float(), torch.stack([-delta, delta], 1).float()
    else:
        raise ValueError(f"choose_levels: unknown level spec {spec!r}")
    levels = levels.float()
    return levels, midpoints(levels)


def ternary_levels(w: torch.Tensor, spec: TernarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``[−α_n, 0, α_p]`` and threshold ``Δ`` per row of ``w [G, N]``.

    TWN: ``Δ = t·mean|w|`` (t = 0.7, the paper's approximation of the optimal threshold for
    Gaussian weights), ``α_p = α_n = mean of |w| where |w| > Δ``. TTQ: ``Δ = t·max|w|``
    (t = 0.05), ``α_p``, ``α_n`` the means of the positive / negative weights beyond ``Δ`` —
    their starting values; training learns them.
    """
    a = w.abs()
    if spec.learned:
        delta = spec.factor * a.amax(1)
        pos, neg = w > delta[:, None], w < -delta[:, None]
        alpha_p = (w * pos).sum(1) / pos.sum(1).clamp_min(1)
        alpha_n = (-w * neg).sum(1) / neg.sum(1).clamp_min(1)
    else:
        delta = spec.factor * a.mean(1)
        big = a > delta[:, None]
        alpha_p = alpha_n = (a * big).sum(1) / big.sum(1).clamp_min(1)
    zero = torch.zeros_like(delta)
    return torch.stack([-alpha_n, zero, alpha_p], 1), delta


def level_indices(x: torch.Tensor, boundaries: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """Each value's level index (int64), in the shape of :func:`groups_view`."""
    w = groups_view(x, spec)
    return torch.searchsorted(boundaries.to(w.dtype).contiguous(), w.detach().contiguous(), right=True)


def decode(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``levels[g, indices[g, n]]``; differentiable in ``levels`` (the gradient of a level is
    the sum over every value that uses it: Deep Compression's gradient sharing)."""
    return levels.gather(1, indices)


def quantize_levels(x: torch.Tensor, levels: torch.Tensor, boundaries: torch.Tensor,
                    spec: LevelSpec) -> torch.Tensor:
    """``x`` with every value replaced by its level (no gradient to ``x``; see the quantizer)."""
    return decode(level_indices(x, boundaries, spec), levels.to(x.dtype)).reshape(x.shape)

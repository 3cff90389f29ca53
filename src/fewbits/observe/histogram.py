"""A streaming histogram on a dyadic lattice: bounded memory, exactly mergeable.

Bin edges are multiples of ``2^k``; a row keeps ``bins`` counts starting at the lattice cell
that holds its minimum. When data arrives outside the covered span, ``k`` grows and pairs of
cells merge exactly (no proportional re-splitting). The state is canonical — ``k`` is the
smallest level at which ``[min, max]`` spans at most ``bins`` cells, and the origin is the cell
of ``min`` — so it depends only on the multiset of values seen, never on their order or on how
the stream was split: merging two histograms equals observing both streams, bit for bit.
At the chosen level the data spans more than ``bins / 2`` cells, so resolution is within a
factor two of an ideal ``bins``-bin histogram over ``[min, max]``.

All arithmetic is in float64 and int64: scaling by ``2^-k`` is exact, and ``k`` is kept at
least ``log2(max|x|) − 40`` so cell indices stay far below 2^53.
"""
from __future__ import annotations

import math

import torch

_K_FLOOR = -200  # finest level, used only while every value seen is 0
_INDEX_BITS = 40  # cells are at least max|x| / 2^40 wide
_MAX_SHIFT = 62


def _float32_exact(x: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``x · 2^-k`` is exact in float32: ``2^-k`` is normal and ≥ 1, so nothing underflows.

    (Overflow cannot happen: levels are at least ``log2(max|x|) − 40``.)
    """
    return x.dtype == torch.float32 and bool(((k > -100) & (k <= 0)).all())


def _cells(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Lattice cell index ``floor(x / 2^k)`` for x [R, N] (float32 or float64), k int64 [R]."""
    if _float32_exact(x, k):
        return torch.floor(x * torch.pow(2.0, -k.to(torch.float32))[:, None]).to(torch.int64)
    return torch.floor(torch.ldexp(x.to(torch.float64), -k[:, None].to(torch.float64))).to(torch.int64)


def fit_level(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Smallest level ``k`` at which ``[lo, hi]`` spans at most ``bins`` cells, per row."""
    amax = torch.maximum(lo.abs(), hi.abs())
    floor_abs = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))).to(torch.int64) - _INDEX_BITS,
        torch.full_like(amax, _K_FLOOR, dtype=torch.int64),
    )
    width = (hi - lo) / bins
    floor_span = torch.where(
        width > 0, torch.floor(torch.log2(width.clamp_min(1e-300))).to(torch.int64),
        torch.full_like(width, _K_FLOOR, dtype=torch.int64),
    )
    k = torch.maximum(torch.maximum(floor_abs, floor_span), torch.tensor(_K_FLOOR))
    while True:  # at most a couple of steps: floor_span is within one of the answer
        span = _cells(hi[:, None], k)[:, 0] - _cells(lo[:, None], k)[:, 0] + 1
        too_wide = span > bins
        if not too_wide.any():
            return k
        k = k + too_wide.to(torch.int64)


def window_holds(lo: torch.Tensor, hi: torch.Tensor, origin: torch.Tensor, k: torch.Tensor, bins: int) -> bool:
    """True when the canonical state for ``[lo, hi]`` is the current one (no re-binning)."""
    lo_cell = _cells(lo[:, None], k)[:, 0]
    hi_cell = _cells(hi[:, None], k)[:, 0]
    return bool(((lo_cell == origin) & (hi_cell < origin + bins)).all())


def rebin(counts: torch.Tensor, origin: torch.Tensor, k: torch.Tensor,
          new_origin: torch.Tensor, new_k: torch.Tensor) -> torch.Tensor:
    """Move counts to a coarser (or equal) level and a new origin, merging cells exactly."""
    rows, bins = counts.shape
    cells = origin[:, None] + torch.arange(bins)[None, :]
    shift = (new_k - k).clamp(0, _MAX_SHIFT)[:, None]
    target = torch.bitwise_right_shift(cells, shift) - new_origin[:, None]  # arithmetic: floor
    # Empty cells may fall outside the window; occupied ones never do (the span fits).
    target = target.clamp(0, bins - 1)
    return torch.zeros_like(counts).scatter_add_(1, target, counts)


class Scratch:
    """Reusable work buffers for :func:`add_values`, grown to the largest batch seen.

    Allocating several multi-megabyte temporaries per batch costs more than the arithmetic
    (page faults); the buffers are working memory bounded by one batch, not by the stream.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


def add_values(counts: torch.Tensor, origin: torch.Tensor, k: torch.Tensor,
               x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """Add samples ``x`` [R, N] (already inside the window) to ``counts`` [R, bins].

    The hot path of calibration: float32 data near zero is binned in float32/int32 (exact, see
    :func:`_float32_exact`; cells fit int32 because the window does), several times faster
    than going through float64 and int64.
    """
    rows, bins = counts.shape
    if _float32_exact(x, k) and bool((origin.abs() < 2**30).all()):
        scratch = scratch or Scratch()
        scaled = torch.mul(x, torch.pow(2.0, -k.to(torch.float32))[:, None], out=scratch.take(x.shape, torch.float32))
        idx = scratch.take(x.shape, torch.int32)
        idx.copy_(scaled.floor_())  # exact integers: truncation after floor is floor
        idx.sub_(origin.to(torch.int32)[:, None])
    else:
        idx = _cells(x, k) - origin[:, None]
    if rows > 1:
        idx = idx + (torch.arange(rows, dtype=idx.dtype) * bins)[:, None]
    return counts + torch.bincount(idx.reshape(-1), minlength=rows * bins).reshape(rows, bins).to(counts.dtype)


def bin_edges(origin: torch.Tensor, k: torch.Tensor, bins: int) -> torch.Tensor:
    """Edges [R, bins + 1] of every row's window."""
    cells = (origin[:, None] + torch.arange(bins + 1)[None, :]).to(torch.float64)
    return torch.ldexp(cells, k[:, None].to(torch.float64))

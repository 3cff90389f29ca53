"""Calibration statistics: what observers accumulate and range estimators read.

Every statistic is per *row* (one row per quantization parameter, see
:mod:`fewbits.numerics.layout`) and remembers the qparam shape to put results back in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.layout import qparam_shape, to_rows
from . import histogram as lattice


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"calibration tensor '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"calibration tensor '{name}' must be floating point, got {x.dtype}")


def row_range(rows: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max (float64); NaN propagates through both, so they also check finiteness."""
    if rows.shape[0] == 1:  # a whole-tensor reduction is several times faster than dim=1 here
        lo, hi = (v.reshape(1) for v in torch.aminmax(rows))
    else:
        lo, hi = torch.aminmax(rows, dim=1)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        bad = (~torch.isfinite(rows)).sum().item()
        raise ValueError(f"calibration tensor '{name}' has {bad} non-finite values (NaN or inf)")
    return lo.to(torch.float64), hi.to(torch.float64)


def check_finite(x: torch.Tensor, name: str) -> None:
    check_tensor(x, name)
    if x.numel():
        row_range(x.detach().reshape(1, -1), name)


@dataclass(frozen=True)
class RangeStats:
    """Running minimum and maximum per row."""

    min: torch.Tensor  # [R] float64
    max: torch.Tensor
    qshape: tuple[int, ...]


@dataclass(frozen=True)
class MovingAverageStats(RangeStats):
    """Exponential moving average of per-batch min/max (``min``/``max`` are the averages).

    ``first_min``/``first_max`` (the first batch's values) and ``count`` make the average
    mergeable: see :meth:`fewbits.observe.MovingAverageObserver.merge`.
    """

    first_min: torch.Tensor
    first_max: torch.Tensor
    count: int
    momentum: float


@dataclass(frozen=True)
class HistogramStats(RangeStats):
    """Exact min/max plus a dyadic-lattice histogram per row (see :mod:`.histogram`)."""

    counts: torch.Tensor  # [R, bins] float64 (integer-valued)
    origin: torch.Tensor  # [R] int64, cell index of bin 0
    level: torch.Tensor  # [R] int64, bins are 2^level wide

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    def edges(self) -> torch.Tensor:
        return lattice.bin_edges(self.origin, self.level, self.bins)

    def weighted_samples(self, per_bin: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Values [R, bins·per_bin] and weights: each bin as ``per_bin`` evenly spread points.

        Treating the mass of a bin as spread uniformly (midpoint rule) rather than sitting at
        its centre keeps the error estimate of fine grids unbiased.
        """
        edges = self.edges()
        width = edges[:, 1:] - edges[:, :-1]
        offsets = (torch.arange(per_bin, dtype=torch.float64) + 0.5) / per_bin
        values = edges[:, :-1, None] + width[:, :, None] * offsets
        values = torch.minimum(torch.maximum(values, self.min[:, None, None]), self.max[:, None, None])
        weights = (self.counts / per_bin)[:, :, None].expand(-1, -1, per_bin)
        rows = self.counts.shape[0]
        return values.reshape(rows, -1), weights.reshape(rows, -1)


@dataclass(frozen=True)
class SampleStats(RangeStats):
    """The values themselves (weights, or a small activation batch), one row per qparam."""

    values: torch.Tensor  # [R, N] float64

    def weighted_samples(self, per_bin: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values, torch.ones_like(self.values)


def sample_stats(x: torch.Tensor, granularity, name: str = "tensor") -> SampleStats:
    """Statistics holding ``x`` itself, for weights: estimators then see every value exactly."""
    check_finite(x, name)
    rows = to_rows(x.detach(), granularity).to(torch.float64)
    if rows.numel() == 0:
        raise ValueError(f"tensor '{name}' is empty: nothing to calibrate on")
    return SampleStats(rows.amin(1), rows.amax(1), qparam_shape(tuple(x.shape), granularity), rows)

"""Observers: accumulate mergeable statistics of a stream of tensors (nothing else).

``update(x)`` folds one batch in, ``merge(other)`` folds in another observer's stream (as if its
batches had come after this one's), ``state()`` returns the statistics for a range estimator.
Statistics are kept per row of the granularity (see :mod:`fewbits.numerics.layout`), so the
same observer serves per-tensor and per-channel activations.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..numerics.layout import qparam_shape, to_rows
from ..spec import Granularity, PerTensor
from . import histogram as lattice
from .stats import HistogramStats, MovingAverageStats, RangeStats, check_tensor, row_range


class Observer:
    """Base: granularity handling, shape checks, the empty-stream error."""

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor") -> None:
        self.granularity = granularity
        self.name = name
        self.qshape: Optional[tuple[int, ...]] = None

    @property
    def empty(self) -> bool:
        return self.qshape is None

    def update(self, x: torch.Tensor) -> None:
        check_tensor(x, self.name)
        if x.numel() == 0:
            return
        qshape = qparam_shape(tuple(x.shape), self.granularity)
        if self.qshape is not None and qshape != self.qshape:
            raise ValueError(
                f"calibration tensor '{self.name}' has qparam shape {qshape} under "
                f"{self.granularity}, earlier batches had {self.qshape}"
            )
        rows = to_rows(x.detach(), self.granularity)
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.to(torch.float32)
        lo, hi = row_range(rows, self.name)
        self._update_rows(rows, lo, hi, first=self.qshape is None)
        self.qshape = qshape

    def merge(self, other: "Observer") -> None:
        """Fold in ``other``'s stream, as if its batches had followed this one's."""
        if type(other) is not type(self) or other.granularity != self.granularity:
            raise ValueError(
                f"cannot merge {type(other).__name__}({other.granularity}) into "
                f"{type(self).__name__}({self.granularity}) for '{self.name}'"
            )
        self._check_compatible(other)
        if other.empty:
            return
        if self.empty:
            self._copy_from(other)
            self.qshape = other.qshape
            return
        if other.qshape != self.qshape:
            raise ValueError(f"cannot merge '{other.name}' of qparam shape {other.qshape} into "
                             f"'{self.name}' of shape {self.qshape}")
        self._merge(other)

    def _check_compatible(self, other: "Observer") -> None:
        """Subclasses reject merging observers built with different settings."""

    def state(self) -> RangeStats:
        if self.empty:
            raise ValueError(
                f"observer for '{self.name}' saw no data: the calibration stream was empty, "
                "so there is no range to estimate"
            )
        return self._state()

    def _copy_from(self, other: "Observer") -> None:
        self.__dict__.update({k: v for k, v in other.__dict__.items() if k not in ("name", "_scratch")})


class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    def _update_rows(self, rows, lo, hi, first):
        self.min = lo if first else torch.minimum(self.min, lo)
        self.max = hi if first else torch.maximum(self.max, hi)

    def _merge(self, other):
        self.min, self.max = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)

    def _state(self):
        return RangeStats(self.min.clone(), self.max.clone(), self.qshape)


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min/max: ``m ← m + c·(batch − m)``.

    The first batch initialises the average (as ``torch.ao``'s MovingAverageMinMaxObserver,
    ``averaging_constant = c = 0.01``). Merging uses the closed form of the recursion: the
    average over stream A then B is ``ema_B + (1 − c)^n_B · (ema_A − first_B)``.
    """

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor",
                 momentum: float = 0.01) -> None:
        super().__init__(granularity, name)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.count = 0

    def _update_rows(self, rows, lo, hi, first):
        if first:
            self.min, self.max, self.first_min, self.first_max = lo, hi, lo, hi
        else:
            self.min = self.min + self.momentum * (lo - self.min)
            self.max = self.max + self.momentum * (hi - self.max)
        self.count += 1

    def _check_compatible(self, other):
        if other.momentum != self.momentum:
            raise ValueError(f"cannot merge moving averages with momentum {other.momentum} and {self.momentum}")

    def _merge(self, other):
        decay = (1 - self.momentum) ** other.count
        self.min = other.min + decay * (self.min - other.first_min)
        self.max = other.max + decay * (self.max - other.first_max)
        self.count += other.count

    def _state(self):
        return MovingAverageStats(self.min.clone(), self.max.clone(), self.qshape,
                                  self.first_min.clone(), self.first_max.clone(), self.count, self.momentum)


class HistogramObserver(Observer):
    """Exact min/max and a ``bins``-bin dyadic-lattice histogram per row (bounded memory)."""

    def __init__(self, granularity: Granularity = PerTensor(), name: str = "tensor",
                 bins: int = 2048) -> None:
        super().__init__(granularity, name)
        if bins < 8:
            raise ValueError(f"bins must be at least 8, got {bins}")
        self.bins = bins
        self._scratch = lattice.Scratch()

    def _refit(self, lo, hi):
        """New level and origin for range [lo, hi]; re-bins the existing counts."""
        level = lattice.fit_level(lo, hi, self.bins)
        origin = lattice._cells(lo[:, None], level)[:, 0]
        return level, origin

    def _update_rows(self, rows, lo, hi, first):
        if not first:
            lo, hi = torch.minimum(lo, self.min), torch.maximum(hi, self.max)
        if first:
            level, origin = self._refit(lo, hi)
            counts = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        elif lattice.window_holds(lo, hi, self.origin, self.level, self.bins):
            level, origin, counts = self.level, self.origin, self.counts
        else:
            level, origin = self._refit(lo, hi)
            counts = lattice.rebin(self.counts, self.origin, self.level, origin, level)
        self.counts = lattice.add_values(counts, origin, level, rows, self._scratch)
        self.min, self.max, self.level, self.origin = lo, hi, level, origin

    def _check_compatible(self, other):
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")

    def _merge(self, other):
        lo, hi = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)
        level, origin = self._refit(lo, hi)
        self.counts = (lattice.rebin(self.counts, self.origin, self.level, origin, level)
                       + lattice.rebin(other.counts, other.origin, other.level, origin, level))
        self.min, self.max, self.level, self.origin = lo, hi, level, origin

    def _state(self):
        return HistogramStats(self.min.clone(), self.max.clone(), self.qshape,
                              self.counts.clone(), self.origin.clone(), self.level.clone())

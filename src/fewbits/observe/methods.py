"""Calibration methods by name: which observer collects, which estimator decides.

Names are what recipes and the command line spell: ``minmax``, ``ema``, ``percentile``,
``mse``, ``entropy``, ``aciq``, ``octav``.
"""
from __future__ import annotations

import enum

import torch

from ..numerics.affine import choose_qparams
from ..spec import Granularity, PerTensor, QuantSpec
from . import estimators, search
from .observers import HistogramObserver, MinMaxObserver, MovingAverageObserver, Observer
from .stats import RangeStats, sample_stats


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    EMA = "ema"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"
    ACIQ = "aciq"
    OCTAV = "octav"

    @classmethod
    def parse(cls, name) -> "CalibrationMethod":
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"calibration method must be one of {allowed}; got {name!r}") from None


_TABLE = {
    CalibrationMethod.MINMAX: (MinMaxObserver, estimators.minmax),
    CalibrationMethod.EMA: (MovingAverageObserver, estimators.ema),
    CalibrationMethod.PERCENTILE: (HistogramObserver, estimators.percentile),
    CalibrationMethod.MSE: (HistogramObserver, search.mse),
    CalibrationMethod.ENTROPY: (HistogramObserver, search.entropy),
    CalibrationMethod.ACIQ: (HistogramObserver, estimators.aciq),
    CalibrationMethod.OCTAV: (HistogramObserver, estimators.octav),
}


def make_observer(method, granularity: Granularity = PerTensor(), name: str = "tensor", **options) -> Observer:
    """The observer that collects what ``method`` needs (options go to the observer)."""
    observer_cls, _ = _TABLE[CalibrationMethod.parse(method)]
    return observer_cls(granularity, name, **options)


def estimate_range(method, stats: RangeStats, spec: QuantSpec, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` float32 tensors in the qparam shape, chosen by ``method`` from ``stats``."""
    _, estimator = _TABLE[CalibrationMethod.parse(method)]
    lo, hi = estimator(stats, spec, **options)
    return lo.to(torch.float32).reshape(stats.qshape), hi.to(torch.float32).reshape(stats.qshape)


def calibrate_qparams(method, stats: RangeStats, spec: QuantSpec, **options):
    """``(scale, zero_point)`` for ``spec`` from the range ``method`` estimates."""
    return choose_qparams(*estimate_range(method, stats, spec, **options), spec)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec, method="minmax", name: str = "weight", **options):
    """``(scale, zero_point)`` for a weight tensor, every value seen exactly (no histogram)."""
    return calibrate_qparams(method, sample_stats(weight, spec.granularity, name), spec, **options)

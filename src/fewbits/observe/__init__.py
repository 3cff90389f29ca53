"""Calibration: observers accumulate statistics, range estimators turn them into clip ranges."""
from .estimators import aciq, aciq_clip_ratio, ema, minmax, octav, percentile
from .methods import CalibrationMethod, calibrate_qparams, estimate_range, make_observer, weight_qparams
from .observers import HistogramObserver, MinMaxObserver, MovingAverageObserver, Observer
from .search import entropy, mse
from .stats import HistogramStats, MovingAverageStats, RangeStats, SampleStats, sample_stats

__all__ = [
    "Observer", "MinMaxObserver", "MovingAverageObserver", "HistogramObserver",
    "RangeStats", "MovingAverageStats", "HistogramStats", "SampleStats", "sample_stats",
    "minmax", "ema", "percentile", "mse", "entropy", "aciq", "aciq_clip_ratio", "octav",
    "CalibrationMethod", "make_observer", "estimate_range", "calibrate_qparams", "weight_qparams",
]

"""Measuring what quantization cost: error metrics, tables, plots."""
from .metrics import sqnr_db

__all__ = ["sqnr_db"]

"""Measuring what quantization cost: error metrics, the evaluation report, tables, plots."""
from .evaluate import LayerReport, Report, evaluate, model_bytes, quantized_bytes
from .metrics import sqnr_db

__all__ = ["sqnr_db", "evaluate", "Report", "LayerReport", "model_bytes", "quantized_bytes"]

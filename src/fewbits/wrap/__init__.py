"""Quantized modules and the prepare → calibrate steps."""
from .fold import fold_batchnorm
from .modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from .prepare import LeftFloat, QuantizedModel, Status, as_call, calibrate, prepare, quantization_disabled
from .quantizer import TensorQuantizer

__all__ = ["QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "TensorQuantizer",
           "prepare", "calibrate", "QuantizedModel", "Status", "LeftFloat", "fold_batchnorm",
           "as_call", "quantization_disabled"]

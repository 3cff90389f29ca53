"""Quantized modules, the quantizer slots, and the model handle they live in."""
from .fold import fold_batchnorm
from .handle import AlgorithmResult, LeftFloat, QuantizedModel, Status, as_call, quantization_disabled, replace_module
from .modules import (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantEmbedding,
                      QuantLinear)
from .quantizer import TensorQuantizer

__all__ = ["QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d", "QuantConvTranspose2d",
           "QuantEmbedding", "TensorQuantizer",
           "QuantizedModel", "Status", "LeftFloat", "AlgorithmResult", "fold_batchnorm",
           "as_call", "quantization_disabled", "replace_module"]


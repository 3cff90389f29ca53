"""Quantization-aware training: grids that train with the model (STE, LSQ, PACT), a training
loop with distillation and data-parallel ranks, and ``finish`` to hand the result to deploy."""
from .batchnorm import QATConvBn, freeze_batchnorm
from .estimators import ESTIMATORS, fake_quantize_estimated
from .quantizers import METHODS, QATQuantizer
from .fit import Distillation, FitConfig, FitResult, cosine_distillation_loss, distillation_loss, fit
from .train import (
    finish,
    freeze_ranges,
    pact_penalty,
    prepare_qat,
    progressive_bits,
    progressive_layers,
    chain,
    qat_quantizers,
    quantizer_parameters,
)

__all__ = [
    "ESTIMATORS", "METHODS", "QATQuantizer", "fake_quantize_estimated", "prepare_qat", "finish", "fit", "FitConfig", "FitResult",
    "Distillation", "distillation_loss", "cosine_distillation_loss", "pact_penalty", "freeze_ranges",
    "qat_quantizers", "quantizer_parameters", "progressive_bits", "progressive_layers", "chain", "QATConvBn", "freeze_batchnorm",
]

"""fewbits: quantize trained PyTorch networks and measure what it costs.

The numerics core (this package's top level) imports only torch and numpy.
"""
from .numerics import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fixed_point_multiplier,
    pack,
    quantize,
    requantize,
    unpack,
)
from .observe import (
    CalibrationMethod,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    calibrate_qparams,
    estimate_range,
    make_observer,
    sample_stats,
    weight_qparams,
)
from .recipe import BUILTIN_RECIPES, LayerRecipe, Recipe, TensorRecipe, get_recipe
from .spec import (APoTSpec, BinarySpec, CodebookSpec, LevelSpec, PerChannel, PerGroup, PerTensor, Pow2Spec, QuantSpec,
                   Rounding, TernarySpec)
from .target import KernelProfile, Target, int8_kernel_profile
from .wrap import AlgorithmResult, QuantizedModel
from .steps import AWQ, GPTQ, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant, StochasticRounding
from .algorithms import apply
from .flow import calibrate, prepare, quantize_model
from .lower import lower
from .export import export_onnx, load, save, verify
from .convert import IntegerModel, convert
from .report import Report, evaluate
from .decide import Sensitivity, auto, sensitivity
from . import compress, qat

__version__ = "0.1.0"

__all__ = [
    "QuantSpec", "PerTensor", "PerChannel", "PerGroup", "Rounding",
    "LevelSpec", "Pow2Spec", "APoTSpec", "CodebookSpec", "BinarySpec", "TernarySpec",
    "choose_qparams", "quantize", "dequantize", "fake_quantize",
    "fixed_point_multiplier", "requantize", "pack", "unpack",
    "MinMaxObserver", "MovingAverageObserver", "HistogramObserver", "CalibrationMethod",
    "make_observer", "estimate_range", "calibrate_qparams", "sample_stats", "weight_qparams",
    "Recipe", "LayerRecipe", "TensorRecipe", "BUILTIN_RECIPES", "get_recipe",
    "prepare", "calibrate", "quantize_model", "QuantizedModel", "evaluate", "Report",
    "Target", "KernelProfile", "int8_kernel_profile", "lower",
    "apply", "AlgorithmResult", "SmoothQuant", "BiasCorrection", "CrossLayerEqualization", "AdaRound",
    "StochasticRounding", "GPTQ", "AWQ", "save", "load", "convert", "IntegerModel",
    "export_onnx", "verify", "qat", "compress", "sensitivity", "Sensitivity", "auto",
]

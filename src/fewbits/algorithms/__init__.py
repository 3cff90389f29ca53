"""Post-training algorithms applied to a prepared model: ``fewbits.apply(qmodel, step, batches)``.

Each algorithm is a pure-math module (the paper's equations, plain tensors in and out) plus a
driver in :mod:`.apply` that runs the hooks and the layer loop. The hyperparameters are the
frozen step objects of :mod:`fewbits.steps`.
"""
from ..steps import AWQ, GPTQ, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant, StochasticRounding
from .apply import AlgorithmResult, apply

__all__ = ["apply", "AlgorithmResult", "SmoothQuant", "BiasCorrection", "CrossLayerEqualization", "AdaRound",
           "StochasticRounding", "GPTQ", "AWQ"]

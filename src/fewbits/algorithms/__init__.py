"""Post-training algorithms applied to a prepared model: ``fewbits.apply(qmodel, step, batches)``.

Each algorithm is a pure-math module (the paper's equations, plain tensors in and out) plus a
driver beside it (``<algorithm>_driver.py``) that runs the hooks and the layer loop, sharing
:mod:`.hooks`; :mod:`.apply` dispatches. The hyperparameters are the
frozen step objects of :mod:`fewbits.steps`.
"""
from ..steps import AWQ, GPTQ, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant, StochasticRounding
from ..wrap.handle import AlgorithmResult
from .apply import apply

__all__ = ["apply", "AlgorithmResult", "SmoothQuant", "BiasCorrection", "CrossLayerEqualization", "AdaRound",
           "StochasticRounding", "GPTQ", "AWQ"]

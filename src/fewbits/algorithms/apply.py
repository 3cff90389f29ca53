"""``fewbits.apply(qmodel, step, batches)``: run one post-training algorithm on a prepared model.

Each algorithm is its math module (the paper's equations, plain tensors in and out) and a
driver beside it (``<algorithm>_driver.py``: hooks, the layer loop, the bookkeeping), sharing
:mod:`.hooks`; this module only dispatches by the step's type.
"""
from __future__ import annotations

import time

from ..steps import (AWQ, GPTQ, STEP_NAMES, AdaRound, BiasCorrection, CrossLayerEqualization, SmoothQuant,
                     StochasticRounding, step_to_dict)
from ..wrap.handle import AlgorithmResult, QuantizedModel, Status, as_call
from .awq_driver import run_awq
from .bias_correction_driver import run_bias_correction
from .cle_driver import run_cle
from .gptq_driver import run_gptq
from .rounding_driver import run_adaround, run_stochastic
from .smoothquant_driver import run_smoothquant

_DRIVERS = {SmoothQuant: run_smoothquant, AWQ: run_awq, BiasCorrection: run_bias_correction, CrossLayerEqualization: run_cle,
            StochasticRounding: run_stochastic, AdaRound: run_adaround, GPTQ: run_gptq}


def apply(qmodel: QuantizedModel, step, batches) -> AlgorithmResult:
    """Run the algorithm ``step`` (e.g. ``fewbits.SmoothQuant()``) on ``qmodel`` with calibration ``batches``.

    Algorithms that change what a layer's input quantizer sees clear those ranges: run
    :func:`fewbits.calibrate` afterwards (a recipe's ``steps`` are run by ``calibrate`` itself).
    Bad batches are rejected before anything changes.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("apply expects the model returned by fewbits.prepare")
    driver = _DRIVERS.get(type(step))
    if driver is None:
        raise ValueError(f"apply: {step!r} is not an algorithm step; known: {sorted(STEP_NAMES.values())}")
    name = STEP_NAMES[type(step)]
    if getattr(step, "needs_ranges", False) and qmodel.status is not Status.CALIBRATED:
        raise ValueError(f"{name} needs calibrated activation ranges: run fewbits.calibrate first "
                         f"(a recipe's '{name}' step runs after the ranges are observed)")
    batches = [as_call(b, i) for i, b in enumerate(batches)]
    if not batches:
        raise ValueError(f"apply {name}: no calibration batches given")
    start = time.perf_counter()
    result = AlgorithmResult(step_to_dict(step))
    driver(qmodel, step, batches, result)
    result.seconds = time.perf_counter() - start
    if result.layers or result.skipped or getattr(step, "required", True):  # a recipe's own step that found nothing
        qmodel.applied.append(result)
    return result


__all__ = ["apply", "AlgorithmResult"]

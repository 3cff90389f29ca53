"""SmoothQuant's driver: per-layer input statistics, the strength chosen or fixed, the
layer smoothed (:meth:`QuantLinear.smooth`) and its input range cleared."""
from __future__ import annotations

import torch

from ..spec import PerTensor
from ..steps import SmoothQuant
from ..wrap.handle import AlgorithmResult, QuantizedModel
from . import smoothquant
from .hooks import clear_activation_ranges, collect_inputs, db, scalable_linears, with_inputs


def _why_not(layer) -> str:
    if layer.input_quantizer is None or layer.weight_quantizer is None:
        return "SmoothQuant needs both an input and a weight quantizer"
    if not isinstance(layer.input_quantizer.spec.granularity, PerTensor):
        return "SmoothQuant targets per-tensor inputs"
    return ""


def run_smoothquant(qmodel: QuantizedModel, step: SmoothQuant, batches: list, result: AlgorithmResult) -> None:
    layers = scalable_linears(qmodel, step.layers, result, "SmoothQuant", _why_not)
    stats = collect_inputs(qmodel, layers, batches, step.samples)
    for name, module, inputs in with_inputs("smoothquant", layers, stats, result):
        wq = module.weight_quantizer
        specs = (module.input_quantizer.spec, wq.spec, wq.recipe.method)
        w_absmax = module.weight.detach().abs().amax(0).float()
        if step.alpha is None:
            alpha, before, after = smoothquant.choose_alpha(inputs, module.weight, step.alpha_grid, *specs)
        else:  # a fixed strength is applied even where it does not help, as in the paper
            alpha = step.alpha
            before = smoothquant.quantized_output_sqnr(inputs, module.weight, torch.ones_like(w_absmax), *specs)
            after = smoothquant.quantized_output_sqnr(
                inputs, module.weight, smoothquant.smoothing_scale(inputs.absmax, w_absmax, alpha), *specs)
        if alpha is not None:
            module.smooth(smoothquant.smoothing_scale(inputs.absmax, w_absmax, alpha))
            clear_activation_ranges(qmodel, [module.input_quantizer])
        result.layers[name] = {"alpha": alpha, "sqnr_db_before": db(before), "sqnr_db_after": db(after)}

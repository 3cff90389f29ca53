"""AWQ's driver: per-layer input statistics, the scale searched, the layer smoothed."""
from __future__ import annotations

import torch

from ..steps import AWQ
from ..wrap.handle import AlgorithmResult, QuantizedModel
from . import awq, smoothquant
from .hooks import collect_inputs, scalable_linears, with_inputs


def _why_not(layer) -> str:
    if layer.weight_quantizer is None:
        return "the weights are not quantized"
    if layer.input_quantizer is not None:
        return "AWQ is for weight-only layers (SmoothQuant balances quantized inputs)"
    return ""


def run_awq(qmodel: QuantizedModel, step: AWQ, batches: list, result: AlgorithmResult) -> None:
    layers = scalable_linears(qmodel, step.layers, result, "AWQ", _why_not)
    stats = collect_inputs(qmodel, layers, batches, step.samples, label="awq statistics")
    grid = [i / step.grid for i in range(step.grid)]
    for name, layer, inputs in with_inputs("awq", layers, stats, result):
        wq = layer.weight_quantizer
        if layer.smooth_scale is not None:
            inputs = smoothquant.LayerInputs(inputs.lo, inputs.hi, inputs.rows / layer.smooth_scale,
                                             inputs.absmean / layer.smooth_scale)
        alpha, before, after = awq.search_alpha(inputs.rows, inputs.absmean, layer.weight, wq.spec, grid,
                                                wq.recipe.method)
        if alpha > 0:
            with torch.no_grad():
                layer.smooth(awq.awq_scale(inputs.absmean, alpha))
        result.layers[name] = {"alpha": alpha, "error_before": before, "error_after": after}

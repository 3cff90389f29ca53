"""Bias correction's driver: empirical (per-channel output means, fp32 vs quantized) or
analytic (from the folded BatchNorm statistics through ReLU / ReLU6)."""
from __future__ import annotations

import torch
from torch import nn

from ..progress import Progress
from ..steps import BiasCorrection, layer_matches
from ..wrap.handle import AlgorithmResult, LeftFloat, QuantizedModel
from ..wrap.modules import recipe_type
from . import bias_correction
from .hooks import LAYERS, add_to_bias, channel_means, layer_chains, output_mean
from .stages import measure_in_order


@torch.no_grad()
def run_bias_correction(qmodel: QuantizedModel, step: BiasCorrection, batches: list, result: AlgorithmResult) -> None:
    wanted = {n: m for n, m in qmodel.quantized_layers().items() if layer_matches(n, step.layers)
              and (not step.types or recipe_type(m) in step.types)}
    layers = {n: m for n, m in wanted.items() if isinstance(m, LAYERS)}
    for name, m in wanted.items():
        if name not in layers:
            result.skipped.append(LeftFloat(name, type(m).__name__, "bias correction treats linear and conv layers"))
    if not layers:
        return
    if step.mode == "analytic":
        _analytic_bias_correction(qmodel, layers, result)
        return
    float_means = channel_means(qmodel.float_model, list(layers), batches)  # insertion order = execution order
    with Progress("bias correction, layer", len(float_means)) as progress:
        # each layer measured with the earlier ones corrected, one stage of the model at a time
        for name, quant in measure_in_order(qmodel.model, list(float_means), batches, output_mean):
            progress.step(name)
            delta = bias_correction.correction(float_means[name], quant)
            add_to_bias(layers[name], delta)
            result.layers[name] = {"mean_abs_shift": round(delta.abs().mean().item(), 6),
                                   "max_abs_shift": round(delta.abs().max().item(), 6)}


def _analytic_bias_correction(qmodel: QuantizedModel, layers: dict, result: AlgorithmResult) -> None:
    sources = {second: (first, through) for first, second, through in
               layer_chains(qmodel, result, (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout))}
    for name, module in layers.items():
        first, through = sources.get(name, (None, []))
        why = ""
        if module.weight_quantizer is None:
            why = "the weights are not quantized"
        elif first not in qmodel.bn_stats:
            why = "its input does not come from a layer with a folded BatchNorm (through ReLU / ReLU6 / nothing)"
        if why:
            result.skipped.append(LeftFloat(name, type(module).__name__, why))
            continue
        mu, sigma = qmodel.bn_stats[first]
        lo, hi = float("-inf"), float("inf")
        for t in through:
            act = qmodel.model.get_submodule(t)
            if isinstance(act, (nn.ReLU, nn.ReLU6)):
                lo = max(lo, 0.0)
            if isinstance(act, nn.ReLU6):
                hi = min(hi, 6.0)
        mean = bias_correction.clipped_normal_mean(mu, sigma, lo, hi)
        error = (module.quantized_weight() - module.weight).detach()
        if getattr(module, "smooth_scale", None) is not None:
            mean = mean / module.smooth_scale.double()
        shift = bias_correction.expected_output_shift(error, mean, getattr(module, "groups", 1))
        add_to_bias(module, -shift)
        result.layers[name] = {"mean_abs_shift": round(shift.abs().mean().item(), 6),
                               "max_abs_shift": round(shift.abs().max().item(), 6), "input_from": first}

"""Cross-layer equalization's driver: the layer pairs, the sweeps, high-bias absorption."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..progress import Progress
from ..steps import CrossLayerEqualization, layer_matches
from ..wrap.handle import AlgorithmResult, LeftFloat, QuantizedModel, replace_module
from ..wrap.modules import QuantConv1d, QuantConv2d, QuantLinear
from ..wrap.standard import shared_parameter_ids
from . import bias_correction, cle
from .hooks import add_to_bias, clear_activation_ranges, depthwise, layer_chains, run_batches


_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.Dropout)  # f(s·x) = s·f(x) for s > 0 (dropout: in eval)


@dataclass
class _Pair:
    first: str
    second: str
    through: list  # activation module names between them
    relu: bool  # a ReLU between: high-bias absorption applies
    depthwise: bool  # the second layer is a depthwise convolution


def _cle_pairs(qmodel: QuantizedModel, step: CrossLayerEqualization, result: AlgorithmResult) -> list[_Pair]:
    """Consecutive quantized layers joined only through ReLU / ReLU6 / identity / dropout, the
    first layer's output used by the second alone."""
    acts = (*_HOMOGENEOUS, nn.ReLU6) if step.relu6 == "relu" else _HOMOGENEOUS
    shared = shared_parameter_ids(qmodel.model)
    pairs = []
    for first_name, second, through in layer_chains(qmodel, result, acts):
        if not (layer_matches(first_name, step.layers) and layer_matches(second, step.layers)):
            continue
        first = qmodel.model.get_submodule(first_name)
        relu = any(isinstance(qmodel.model.get_submodule(t), (nn.ReLU, nn.ReLU6)) for t in through)
        m2 = qmodel.model.get_submodule(second)
        why = ""
        if type(first) is QuantLinear and type(m2) is not QuantLinear or type(first) is not QuantLinear and type(m2) is QuantLinear:
            why = "a linear layer and a convolution: their channels do not line up one to one"
        elif isinstance(m2, (QuantConv1d, QuantConv2d)) and m2.groups > 1 and not depthwise(m2):
            why = "grouped (not depthwise) convolution as the second layer"
        elif getattr(first, "smooth_scale", None) is not None or getattr(m2, "smooth_scale", None) is not None:
            why = "already smoothed by SmoothQuant"
        elif id(first.weight) in shared or id(m2.weight) in shared:
            why = "a weight tied to another module: rescaling it would change that module too"
        if why:
            result.skipped.append(LeftFloat(f"{first_name} → {second}", "pair", why))
            continue
        pairs.append(_Pair(first_name, second, through, relu, depthwise(m2)))
    return pairs


@torch.no_grad()
def run_cle(qmodel: QuantizedModel, step: CrossLayerEqualization, batches: list, result: AlgorithmResult) -> None:
    pairs = _cle_pairs(qmodel, step, result)
    models = (qmodel.model, qmodel.float_model)  # the fp32 reference changes with it: same function
    for pair in pairs:  # ReLU6 → ReLU where it sits between equalized layers (the paper's choice)
        for name in pair.through:
            for model in models:
                if isinstance(model.get_submodule(name), nn.ReLU6):
                    replace_module(model, name, nn.ReLU())
                    if model is qmodel.model:
                        result.layers.setdefault("relu6_replaced", []).append(name)

    def spread(name):
        r = cle.output_ranges(qmodel.model.get_submodule(name).weight)
        return round(float(r.max() / r.clamp(min=1e-12).min()), 2)

    before = {p.first: spread(p.first) for p in pairs}
    total = {p.first: torch.ones(qmodel.model.get_submodule(p.first).weight.shape[0], dtype=torch.float64) for p in pairs}
    sweeps = 0
    with Progress("cross-layer equalization, sweep", step.iterations) as progress:
        for sweeps in range(1, step.iterations + 1):
            progress.step()
            change = 0.0
            for pair in pairs:
                w1, w2 = (qmodel.model.get_submodule(n).weight for n in (pair.first, pair.second))
                s = cle.equalization_scale(cle.output_ranges(w1), cle.input_ranges(w2, pair.depthwise))
                change = max(change, float((s - 1).abs().max()))
                total[pair.first] *= s
                for model in models:
                    l1, l2 = model.get_submodule(pair.first), model.get_submodule(pair.second)
                    cle.scale_output_channels(l1.weight, l1.bias, s)
                    cle.scale_input_channels(l2.weight, s, pair.depthwise)
                if pair.first in qmodel.bn_stats:  # the output's BatchNorm statistics scale with it
                    mu, sigma = qmodel.bn_stats[pair.first]
                    qmodel.bn_stats[pair.first] = (mu / s.to(mu.dtype), sigma / s.to(sigma.dtype))
            if change < step.tolerance:
                break
    absorbed = {}
    if step.high_bias_absorption:
        exact = []
        for p in pairs:
            padding = getattr(qmodel.model.get_submodule(p.second), "padding", 0)
            if p.relu and (padding == "valid" or not any(padding if isinstance(padding, tuple) else (padding,))):
                exact.append(p)
            elif p.relu:
                result.skipped.append(LeftFloat(f"{p.first} → {p.second}", "high-bias absorption",
                                                "the second layer pads with zeros: the border outputs would see "
                                                "c only from inside the image; bias kept"))
        absorbed = _absorb_high_biases(qmodel, exact, batches)
    for pair in pairs:
        result.layers[f"{pair.first} → {pair.second}"] = {
            "scale_min": round(float(total[pair.first].min()), 4), "scale_max": round(float(total[pair.first].max()), 4),
            "range_spread_before": before[pair.first], "range_spread_after": spread(pair.first),
            **({"absorbed_mean": round(absorbed[pair.first], 6)} if pair.first in absorbed else {})}
    result.layers["sweeps"] = sweeps
    changed = {n for p in pairs for n in (p.first, p.second)}
    for name in changed:
        qmodel.model.get_submodule(name).refit_weight()
    clear_activation_ranges(qmodel)  # the activations are rescaled: observe them again


def _absorb_high_biases(qmodel: QuantizedModel, pairs: list, batches: list) -> dict:
    """Per pair with a ReLU between: measure the first layer's pre-activations on the batches (fp32
    reference model), absorb ``c = max(0, mean − 3 std)`` into the second layer's bias."""
    stats: dict = {}

    def hook(name):
        def grab(module, _args, out):
            dim = 1 if not isinstance(module, nn.Linear) else out.dim() - 1
            (s1, n), (s2, _) = bias_correction.channel_sum(out, dim), bias_correction.channel_sum(out.double() ** 2, dim)
            old = stats.get(name, (0.0, 0.0, 0))
            stats[name] = (old[0] + s1, old[1] + s2, old[2] + n)
        return grab

    model = qmodel.float_model
    run_batches(model, batches, [model.get_submodule(p.first).register_forward_hook(hook(p.first)) for p in pairs],
                "high-bias absorption statistics, batch")
    absorbed = {}
    for pair in pairs:
        if pair.first not in stats:
            continue
        s, s2, n = stats[pair.first]
        mean = s / n
        std = (s2 / n - mean.pow(2)).clamp(min=0).sqrt()
        c = cle.absorption_amount(mean, std)
        if not bool((c > 0).any()):
            absorbed[pair.first] = 0.0
            continue
        for m in (qmodel.model, qmodel.float_model):
            l1, l2 = m.get_submodule(pair.first), m.get_submodule(pair.second)
            gain = cle.absorbed_bias(l2.weight, c, pair.depthwise)
            add_to_bias(l1, -c)
            add_to_bias(l2, gain)
        if pair.first in qmodel.bn_stats:
            mu, sigma = qmodel.bn_stats[pair.first]
            qmodel.bn_stats[pair.first] = (mu - c.to(mu.dtype), sigma)
        absorbed[pair.first] = float(c.mean())
    return absorbed

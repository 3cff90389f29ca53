"""The rounding drivers: stochastic rounding and AdaRound, layer by layer in execution order."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..numerics.layout import expand
from ..progress import Progress
from ..steps import AdaRound, StochasticRounding
from ..wrap.handle import AlgorithmResult, QuantizedModel
from ..wrap.modules import QuantLinear
from . import adaround
from .hooks import execution_order, layer_inputs, rounding_layers


def _grid_of(layer: nn.Module) -> tuple:
    """(W/s, zero point, qmin, qmax, scale) of the layer's weight view, broadcast to it."""
    wq = layer.weight_quantizer
    view = layer.weight_view().detach().float()
    s, z = (expand(t.float(), tuple(view.shape), wq.spec.granularity) for t in (wq.scale, wq.zero_point))
    return view * torch.reciprocal(s), z, wq.spec.qmin, wq.spec.qmax, s


def _write_levels(layer: nn.Module, levels: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> None:
    """Put the weight on the chosen grid points: nearest rounding (the quantizer, its qparams
    unchanged) then gives exactly these levels."""
    layer.weight.data.copy_(layer.weight_from_view((levels - z) * s).to(layer.weight.dtype))


@torch.no_grad()
def run_stochastic(qmodel: QuantizedModel, step: StochasticRounding, batches: list, result: AlgorithmResult) -> None:
    generator = torch.Generator().manual_seed(step.seed)
    for name, layer in rounding_layers(qmodel, step.layers, result).items():
        scaled, z, qmin, qmax, s = _grid_of(layer)
        levels = adaround.stochastic_levels(scaled, z, qmin, qmax, generator)
        result.layers[name] = {"changed_from_nearest": round(adaround.flips(levels, scaled, z, qmin, qmax), 4)}
        _write_levels(layer, levels, z, s)


def run_adaround(qmodel: QuantizedModel, step: AdaRound, batches: list, result: AlgorithmResult) -> None:
    layers = rounding_layers(qmodel, step.layers, result)
    order = execution_order(qmodel.float_model, list(layers), batches[0])
    generator = torch.Generator().manual_seed(step.seed)
    with Progress("adaround, layer", len(order)) as progress:
        for name in order:
            progress.step(name)
            start = time.perf_counter()
            layer = layers[name]
            with torch.no_grad():
                x_fp = layer_inputs(qmodel.float_model, name, batches)
                target = qmodel.float_model.get_submodule(name)(x_fp)
                del x_fp
                x_q = layer.quantize_input(layer_inputs(qmodel.model, name, batches))  # earlier layers rounded
                bias = layer.quantized_bias()
                bias = None if bias is None else bias.detach()
            result.layers[name] = _adaround_layer(layer, x_q, target, bias, step, generator)
            result.layers[name]["seconds"] = round(time.perf_counter() - start, 2)


def _adaround_layer(layer, x_q, target, bias, step: AdaRound, generator) -> dict:
    scaled, z, qmin, qmax, s = _grid_of(layer)
    floor = torch.floor(scaled)
    channel = -1 if isinstance(layer, QuantLinear) else 1

    def weight_of(levels):
        return layer.weight_from_view((levels - z) * s)

    def error(levels) -> float:  # the reconstruction loss on (up to) 256 samples, in float64
        with torch.no_grad():
            out = layer.compute(x_q[:256], weight_of(levels), bias)
            return float((out - target[:256]).double().pow(2).sum(channel).mean())

    nearest = torch.clamp(torch.round(scaled) + z, qmin, qmax)
    v = adaround.initial_v(scaled).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=step.lr)
    n = x_q.shape[0]
    with torch.enable_grad():  # calibrate runs recipe steps under no_grad
        for it in range(step.iterations):
            idx = torch.randint(n, (min(step.batch_size, n),), generator=generator)
            out = layer.compute(x_q[idx], weight_of(adaround.soft_levels(floor, v, z, qmin, qmax)), bias)
            loss = (out - target[idx]).pow(2).sum(channel).mean()
            b = adaround.beta(it, step.iterations, step.warmup, step.beta_start, step.beta_end)
            if b is not None and step.reg_weight > 0:
                loss = loss + step.reg_weight * adaround.regularizer(v, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    levels = adaround.hard_levels(floor, v.detach(), z, qmin, qmax)
    before, after = error(nearest), error(levels)
    with torch.no_grad():
        _write_levels(layer, levels, z, s)
    return {"error_nearest": before, "error_adaround": after,
            "changed_from_nearest": round(adaround.flips(levels, scaled, z, qmin, qmax), 4)}

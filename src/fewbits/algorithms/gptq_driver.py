"""GPTQ's driver: each layer's Hessian from its (quantized) inputs, then the column-wise update."""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from ..observe.methods import weight_qparams
from ..progress import Progress
from ..spec import PerChannel, PerGroup
from ..steps import GPTQ
from ..wrap.handle import AlgorithmResult, LeftFloat, QuantizedModel
from ..wrap.modules import QuantConv2d, QuantLinear
from . import gptq
from .hooks import Stop, execution_order, rounding_layers
from .stages import measure_in_order


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies, one row per product: the (smoothed, quantized) input,
    unfolded into patches for a convolution (columns in the order of ``weight.reshape(out, -1)``)."""
    x = layer.quantize_input(x)
    if isinstance(layer, QuantLinear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _hessian(layer: nn.Module, _name: str):
    """A forward hook summing the layer's input Hessian (then skipping the rest of the forward)
    and a function reading ``(H, rows)``: the shape :func:`.stages.measure_in_order` measures with."""
    acc = {"h": None, "n": 0}

    def hook(_module, args, _out):
        h, n = gptq.hessian(_input_rows(layer, args[0].detach()))
        acc["h"] = h if acc["h"] is None else acc["h"] + h
        acc["n"] += n
        raise Stop

    return hook, lambda: (acc["h"], acc["n"])


@torch.no_grad()
def run_gptq(qmodel: QuantizedModel, step: GPTQ, batches: list, result: AlgorithmResult) -> None:
    layers = {}
    for name, m in rounding_layers(qmodel, step.layers, result).items():
        if not (isinstance(m, QuantLinear) or (isinstance(m, QuantConv2d) and m.groups == 1)):
            result.skipped.append(LeftFloat(name, type(m).__name__, "GPTQ here handles linear layers and ungrouped "
                                                                    "2-d convolutions"))
        elif isinstance(m.weight_quantizer.spec.granularity, PerGroup) and \
                m.weight_quantizer.spec.granularity.axis % 2 != 1:
            result.skipped.append(LeftFloat(name, type(m).__name__, "groups must run along the input dimension"))
        else:
            layers[name] = m
    order = execution_order(qmodel.float_model, list(layers), batches[0])
    with Progress("gptq, layer", len(order)) as progress:
        start = time.perf_counter()
        # each layer's inputs come from the earlier layers already quantized, one stage at a time
        for name, (h, n) in measure_in_order(qmodel.model, order, batches, _hessian):
            progress.step(name)
            result.layers[name] = _gptq_layer(layers[name], h, n, step)
            result.layers[name]["seconds"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()


def _gptq_layer(layer: nn.Module, h: torch.Tensor, n: int, step: GPTQ) -> dict:
    wq = layer.weight_quantizer
    spec = wq.spec
    view = layer.weight_view().detach()
    rows = view.shape[0]
    group = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None

    def per_group(t: torch.Tensor) -> torch.Tensor:  # qparams as [rows, groups]; one group without groups
        t = t.detach().double()
        return t.reshape(rows, -1) if group else t.reshape(-1).expand(rows).reshape(rows, 1)

    scale, zero = per_group(wq.scale), per_group(wq.zero_point)
    per_row = replace(spec, granularity=PerChannel(0))
    refit = (lambda cols: weight_qparams(cols.float(), per_row, wq.recipe.method, wq.name)) if group else None
    levels, scale, zero = gptq.gptq(view, h, scale, zero, spec.qmin, spec.qmax, group_size=group,
                                    block_size=step.block_size, damp=step.damp, act_order=step.act_order, refit=refit)
    cols = torch.arange(view.shape[1]) // (group or view.shape[1])
    deq = (levels - zero[:, cols]) * scale[:, cols]
    nearest = wq(view).detach().double()  # round-to-nearest with the qparams prepare fitted
    before = gptq.output_error(view.double() - nearest, h, n)
    after = gptq.output_error(view.double() - deq, h, n)
    layer.weight.data.copy_(layer.weight_from_view(deq).to(layer.weight.dtype))
    if group:
        wq.set_qparams(scale.reshape(wq.scale.shape).to(wq.scale.dtype),
                       zero.reshape(wq.zero_point.shape).to(wq.zero_point.dtype))
    return {"error_nearest": before, "error_gptq": after}

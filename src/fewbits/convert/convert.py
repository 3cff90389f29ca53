"""convert: the calibrated simulated model → an integer model computing the same thing.

Every quantized linear / convolution layer becomes an :class:`IntegerLinear` /
:class:`IntegerConv`: its input is quantized once (or arrives as integers), multiplied with the
integer weights into an int32 accumulator (plus the int32 bias ``round(b / (s_x·s_w))``), and
either dequantized to float or — when ``torch.fx`` shows that its output reaches the next
quantized layer only through ReLU, ReLU6, max pooling, flatten, identity or dropout —
requantized with fixed-point multipliers straight into the next layer's input grid, with the
ReLU / ReLU6 turned into clamp bounds. Those operations commute with a monotone grid, so the
chain is the simulated model's arithmetic done on integers. Everything else (residual additions,
average pooling, normalization, attention, activations other than ReLU/ReLU6) runs in float
between a dequantize and the next layer's quantize, exactly as in the simulated model, and is
reported as a float island.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..wrap.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, int32_accumulator_blocker
from ..wrap.prepare import LeftFloat, QuantizedModel, Status, _replace
from .layers import IntegerConv, IntegerEmbedding, IntegerLinear, IntegerMaxPool, OutputGrid

_GRID_PRESERVING = (nn.Flatten, nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


@dataclass(frozen=True)
class Chain:
    """An integer path: ``source`` requantizes into ``target``'s grid through ``through``."""

    source: str
    target: str
    through: tuple


class IntegerModel(nn.Module):
    """The converted network (``model``), what stayed float (``float_islands``) and the chains."""

    def __init__(self, model: nn.Module, float_islands: list[LeftFloat], chains: list[Chain], recipe, note: str):
        super().__init__()
        self.model = model
        self.float_islands, self.chains, self.recipe, self.note = float_islands, chains, recipe, note
        self.status = Status.CONVERTED

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def integer_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, (IntegerLinear, IntegerConv))}


def _why_float(layer: nn.Module) -> str:
    if layer.output_quantizer is not None:
        return "output quantizers are not converted yet: runs simulated"
    return int32_accumulator_blocker(layer.input_quantizer, layer.weight_quantizer)


@torch.no_grad()
def convert(qmodel: QuantizedModel) -> IntegerModel:
    """The integer model of a calibrated ``qmodel`` (which is left unchanged)."""
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("convert expects the model returned by fewbits.prepare")
    if qmodel.status is not Status.CALIBRATED:
        raise ValueError("convert: the model is not calibrated: run fewbits.calibrate(qmodel, batches) first")
    work = copy.deepcopy(qmodel.model)
    islands = list(qmodel.left_float)
    integer = {}
    for name, layer in list(work.named_modules()):
        if isinstance(layer, QuantEmbedding) and layer.weight_quantizer is not None:
            if layer.max_norm is not None:
                islands.append(LeftFloat(name, "QuantEmbedding", "max_norm renormalizes rows at lookup: runs simulated"))
                continue
            _replace(work, name, IntegerEmbedding(layer))
        elif isinstance(layer, (QuantLinear, QuantConv1d, QuantConv2d)):
            why = _why_float(layer)
            if why:
                islands.append(LeftFloat(name, type(layer).__name__, why))
                continue
            new = IntegerLinear(layer) if isinstance(layer, QuantLinear) else IntegerConv(layer)
            integer[name] = new
            _replace(work, name, new)
    chains, note = _fuse_chains(work, integer)
    return IntegerModel(work, islands, chains, qmodel.recipe, note)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (IntegerLinear, IntegerConv, IntegerEmbedding, IntegerMaxPool)) or \
            super().is_leaf_module(m, qualname)


def _fuse_chains(work: nn.Module, integer: dict) -> tuple[list[Chain], str]:
    try:
        graph = _Tracer().trace(work)
    except Exception as err:  # noqa: BLE001 — any tracing failure only means no chains
        return [], f"not traceable by torch.fx ({type(err).__name__}): every integer layer returns float"
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in integer or calls.count(node.target) != 1:
            continue
        through, cur, target = [], node, None
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.op != "call_module" or calls.count(user.target) != 1:
                break
            module = work.get_submodule(user.target)
            nxt = integer.get(user.target)
            if nxt is not None:
                if nxt.smooth_scale is None and user.args and user.args[0] is cur:
                    target = nxt
                break
            if not isinstance(module, (nn.ReLU, nn.ReLU6, *_POOLS, *_GRID_PRESERVING)):
                break
            through.append(user.target)
            cur = user
        if target is None:
            continue
        grid = OutputGrid(float(target.x_scale), int(target.x_zero_point), target.in_spec.qmin, target.in_spec.qmax)
        for name in through:
            module = work.get_submodule(name)
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                grid.clamp_below(0.0)
                if isinstance(module, nn.ReLU6):
                    grid.clamp_above(6.0)
                _replace(work, name, nn.Identity())  # the clamp happens in requantize
            elif isinstance(module, _POOLS):
                _replace(work, name, IntegerMaxPool(module))
        integer[node.target].requantize_into(grid)
        chains.append(Chain(node.target, target.name, tuple(through)))
    return chains, f"{len(chains)} integer chains found by torch.fx"

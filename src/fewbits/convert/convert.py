"""convert: the calibrated simulated model → an integer model computing the same thing.

Every quantized linear / convolution layer becomes an :class:`IntegerLinear` /
:class:`IntegerConv`: its input is quantized once (or arrives as integers), multiplied with the
integer weights into an int32 accumulator (plus the int32 bias ``round(b / (s_x·s_w))``), and
either dequantized to float or requantized with fixed-point multipliers into the grid of what
consumes it. The quantized ops between layers become integer ops: additions (recipe ``adds``)
an :class:`IntegerAdd` (both operands rescaled onto the output grid with fixed-point multipliers
sharing one shift), average pooling (``pools``) an :class:`IntegerAvgPool` (exact window sums,
one multiplier per window size), concatenation (``concats``) an :class:`IntegerConcat` (each
operand requantized onto the output grid).

``torch.fx`` decides where integers flow (an integer chain):

* a layer whose output reaches one consumer only through ReLU, ReLU6, max pooling, flatten /
  reshapes, identity or dropout requantizes into that consumer's grid, ReLU / ReLU6 as clamp
  bounds (they commute with a monotone grid); the consumer is a layer's input or an op's operand;
* a layer or an op whose output goes straight to several consumers hands them integers when
  all of them quantize on the same grid (e.g. a residual block's input, feeding both the
  block's first convolution and its addition, calibrated on the same tensor);
* an op (addition, pool, concatenation) hands integers on, through max pooling and reshapes
  only, when its own output grid is the consumer's grid.

Everything else (normalization, attention, other activations, ops the recipe left float) runs
in float between a dequantize and the next quantize, exactly as in the simulated model, and
is reported as a float island.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..lower import Kind, lower
from ..target import Target
from ..wrap.handle import LeftFloat, QuantizedModel, Status, replace_module
from ..wrap.ops import QuantAdd, QuantConcat, QuantMatMul, QuantMul, QuantPool
from .layers import (IntegerAdd, IntegerAvgPool, IntegerConcat, IntegerConv, IntegerEmbedding, IntegerLinear, IntegerMatMul, IntegerMul,
                     IntegerMaxPool, OutputGrid)

_GRID_PRESERVING = (nn.Flatten, nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
# OpRecord.type is the quantized op's class name
_FIXED_GRID = (IntegerAdd, IntegerMul, IntegerAvgPool, IntegerConcat)  # ops with their own output grid
_INTEGER_OPS = {QuantAdd.__name__: IntegerAdd, QuantMul.__name__: IntegerMul, QuantPool.__name__: IntegerAvgPool,
                QuantConcat.__name__: IntegerConcat, QuantMatMul.__name__: IntegerMatMul}
_RESHAPES = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous"}  # tensor methods keeping levels


def _reshape(node) -> bool:
    """A call that only rearranges its first argument's values (integers stay integers)."""
    return (node.op == "call_method" and node.target in _RESHAPES) or \
        (node.op == "call_function" and node.target in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze))


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


@torch.no_grad()
def convert(qmodel: QuantizedModel, target: Target | None = None) -> IntegerModel:
    """The integer model of a calibrated ``qmodel`` (which is left unchanged), built from its
    lowered records on ``target`` (default :meth:`Target.reference`: exact integer arithmetic;
    a target with recorded ``weight_bits`` reproduces a narrowed ONNX file)."""
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("convert expects the model returned by fewbits.prepare")
    qmodel.require_calibrated("convert")
    lowering = lower(qmodel, target or Target.reference())
    work = copy.deepcopy(qmodel.model)
    islands = [LeftFloat(r.name, r.type, r.reason) for r in lowering.floats.values()]
    integer = {}
    for name, record in lowering.layers.items():
        if record.op == "embedding" and record.kind is Kind.WEIGHT_ONLY:
            replace_module(work, name, IntegerEmbedding(record))
        elif record.kind is Kind.INTEGER:
            new = IntegerLinear(record) if record.op == "linear" else IntegerConv(record)
            integer[name] = new
            replace_module(work, name, new)
        else:
            if record.narrowed_from is not None:  # the simulated layer runs on the target's narrower weights
                work.get_submodule(name).weight_quantizer.set_grid(record.weight_spec, record.w_scale,
                                                                   record.w_zero_point)
            islands.append(LeftFloat(name, record.type, record.reason))
    for name, record in lowering.ops.items():
        if record.kind is Kind.INTEGER:
            replace_module(work, name, _INTEGER_OPS[record.type](record))
        else:
            islands.append(LeftFloat(name, record.type, record.reason))
    chains, note = _fuse_chains(work, integer)
    return IntegerModel(work, islands, chains, qmodel.recipe, note)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (IntegerLinear, IntegerConv, IntegerEmbedding, IntegerMaxPool, *_FIXED_GRID)) or \
            super().is_leaf_module(m, qualname)


def _consumer_grid(work: nn.Module, integer: dict, node, value) -> OutputGrid | None:
    """The grid on which the call ``node`` takes ``value`` as integers, if it can."""
    if node.op != "call_module":
        return None
    module = work.get_submodule(node.target)
    if node.target in integer:
        layer = integer[node.target]
        if layer.smooth_scale is None and node.args and node.args[0] is value and len(node.args) == 1:
            return OutputGrid(float(layer.x_scale), int(layer.x_zero_point), layer.in_spec.qmin, layer.in_spec.qmax)
        return None
    if isinstance(module, IntegerAvgPool):
        grids = [module.a] if len(node.args) == 1 else []
    elif isinstance(module, (IntegerAdd, IntegerMul)):
        grids = [module.a, module.b] if len(node.args) == 2 else []
    elif isinstance(module, IntegerConcat):
        grids = module.grids if len(node.args) == len(module.grids) else []
    else:
        return None
    if node.kwargs or sum(a is value for a in node.args) != 1 or not grids:
        return None  # the value must be exactly one operand
    g = grids[[a is value for a in node.args].index(True)]
    return OutputGrid(g.scale, g.zero_point, g.spec.qmin, g.spec.qmax)


def _same(g1: OutputGrid, g2: OutputGrid) -> bool:
    return (g1.zero_point == g2.zero_point and g1.qmin == g2.qmin and g1.qmax == g2.qmax
            and abs(g1.scale / g2.scale - 1) < 1e-5)


def _fuse_chains(work: nn.Module, integer: dict) -> tuple[list[Chain], str]:
    try:
        graph = _Tracer().trace(work)
    except Exception as err:  # noqa: BLE001 — any tracing failure only means no chains
        return [], f"not traceable by torch.fx ({type(err).__name__}): every integer layer returns float"
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls.count(node.target) != 1:
            continue
        producer = work.get_submodule(node.target)
        if node.target not in integer and not _fixed(producer):
            continue
        # several consumers: all must take integers on one grid, straight from the producer
        if len(node.users) > 1:
            grids = [_consumer_grid(work, integer, user, node) for user in node.users]
            if any(g is None for g in grids) or any(calls.count(u.target) != 1 for u in node.users) or \
                    not all(_same(grids[0], g) for g in grids[1:]):
                continue
            if _emit(producer, grids[0]):
                chains.append(Chain(node.target, ",".join(str(u.target) for u in node.users), ()))
            continue
        through, cur, grid, target = [], node, None, ""
        while len(cur.users) == 1:
            (user,) = cur.users
            if _reshape(user) and user.args and user.args[0] is cur:
                through.append(user)
                cur = user
                continue
            if user.op != "call_module" or calls.count(user.target) != 1:
                break
            grid = _consumer_grid(work, integer, user, cur)
            if grid is not None:
                target = user.target
                break
            module = work.get_submodule(user.target)
            # an op with its own grid hands it on unchanged only: no clamps in between
            allowed = (*_POOLS, *_GRID_PRESERVING) if _fixed(producer) else \
                (nn.ReLU, nn.ReLU6, *_POOLS, *_GRID_PRESERVING)
            if not isinstance(module, allowed):
                break
            through.append(user)
            cur = user
        if grid is None:
            continue
        for step in through:
            if step.op != "call_module":
                continue  # a reshape: integers pass as they are
            module = work.get_submodule(step.target)
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                grid.clamp_below(0.0)
                if isinstance(module, nn.ReLU6):
                    grid.clamp_above(6.0)
                replace_module(work, step.target, nn.Identity())  # the clamp happens in requantize
            elif isinstance(module, _POOLS):
                replace_module(work, step.target, IntegerMaxPool(module))
        if _emit(producer, grid):
            chains.append(Chain(node.target, target, tuple(str(s.target) for s in through)))
    return chains, f"{len(chains)} integer chains found by torch.fx"


def _fixed(producer: nn.Module) -> bool:
    """An op or a layer with its own output grid: it hands integers on only on that grid."""
    return isinstance(producer, _FIXED_GRID) or getattr(producer, "out", None) is not None


def _emit(producer: nn.Module, grid: OutputGrid) -> bool:
    """Make ``producer`` hand integers on ``grid`` to its consumers; False when it cannot."""
    if _fixed(producer):
        out = producer.out
        if not _same(OutputGrid(out.scale, out.zero_point, out.spec.qmin, out.spec.qmax), grid):
            return False  # a second rounding onto another grid: leave it to the consumer, in float
        producer.emit_integers = True
        return True
    producer.requantize_into(grid)
    return True

"""``lower(qmodel, target)``: each quantized layer and op of a calibrated model → one frozen record.

The only place a layer's deployed form is decided (:func:`~fewbits.lower.kinds.deployed_kind`)
and the only place its integer weight (:func:`integer_weight`) and int32 bias are computed. The
integer model (:func:`fewbits.convert`), the ONNX exporter, ``fewbits.verify``, the packed file
and the size in ``fewbits.evaluate`` read these records.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from ..numerics.accumulator import accumulator_scale, int32_bias, to_int32
from ..numerics.affine import quantize
from ..numerics.levels import level_indices
from ..observe.methods import weight_qparams
from ..spec import LevelSpec
from ..target import INT16_MAX, INT16_MIN, NARROW_BITS, Target, pair_sum_bound
from ..wrap.handle import QuantizedModel
from ..wrap.ops import QUANT_OPS, QuantAdd, QuantConcat, QuantMatMul, QuantPool
from .kinds import INTEGER_KINDS, Kind, deployed_kind, dynamic_u8, op_kind, per_token_u8
from .records import FloatRecord, Grid, LayerRecord, Lowering, OpRecord

_OPS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
        nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d", nn.Embedding: "embedding"}


def integer_weight(view: torch.Tensor, quantizer, spec=None, scale=None, zero_point=None) -> torch.Tensor:
    """The weight's integer levels: ``quantize(view, s, z)`` on the quantizer's grid (or the given
    ``spec`` / qparams), level indices on a non-uniform grid."""
    spec = spec or quantizer.spec
    if isinstance(spec, LevelSpec):
        return level_indices(view.detach(), quantizer.boundaries, spec)
    scale = quantizer.scale if scale is None else scale
    zero_point = quantizer.zero_point if zero_point is None else zero_point
    return quantize(view.detach(), scale, zero_point, spec)


def u8_shift(spec) -> int:
    """What moves an activation grid onto uint8 levels, the form the u8×s8 kernels take
    (signed 8-bit grids: the zero point moves by 128)."""
    return 128 if spec.signed and spec.bits == 8 else max(0, -spec.qmin)


def _depthwise(layer: nn.Module) -> bool:
    """ONNX Runtime runs these with its depthwise kernel, which sums in int32 (measured here:
    full-range weights leave the levels after depthwise layers exact; tested)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups == layer.in_channels == layer.out_channels


def _narrowing(name: str, layer: nn.Module, qweight: torch.Tensor, target: Target) -> tuple[Optional[int], str]:
    """``(bits, note)``: the width the target needs for this integer layer's weights (``None``:
    as the recipe has them) and why."""
    bits = layer.weight_quantizer.spec.bits
    explicit = dict(target.weight_bits).get(name)
    if explicit is not None:
        return (explicit, f"re-quantized to {explicit} bits as recorded") if explicit != bits else (None, "")
    mode, profile = target.weights, target.profile
    if not (mode == "narrow" or (mode == "auto" and profile.pair_saturation and not _depthwise(layer))):
        if mode == "auto" and profile.pair_saturation:
            return None, f"{bits}-bit weights kept: depthwise, ONNX Runtime's depthwise kernel sums in int32"
        return None, ""
    xs = layer.input_quantizer.spec
    lo, hi = pair_sum_bound(qweight, xs.qmax + u8_shift(xs))
    if bits > NARROW_BITS and (mode == "narrow" or not INT16_MIN <= lo <= hi <= INT16_MAX):
        note = (f"weight pairs reach [{lo}, {hi}] beyond int16: re-quantized to {NARROW_BITS} bits"
                if mode == "auto" else f"weights='narrow': re-quantized to {NARROW_BITS} bits")
        return NARROW_BITS, note
    return None, f"{bits}-bit weights kept: pair sums within [{lo}, {hi}]"


def _check_dynamic(name: str, layer: nn.Module, target: Target) -> None:
    if target.engine != "onnxruntime":
        return
    for slot in ("input", "output"):
        q = getattr(layer, f"{slot}_quantizer", None)
        if q is not None and q.recipe.dynamic and not (slot == "input" and (dynamic_u8(q) or per_token_u8(q))):
            raise ValueError(f"export_onnx: layer '{name}' quantizes its {slot} dynamically on a grid the export "
                             "does not compute (8-bit asymmetric inputs, per tensor or per token, only)")


@torch.no_grad()
def lower_layer(name: str, layer: nn.Module, target: Target) -> LayerRecord:
    """The record of one quantized layer on ``target``."""
    _check_dynamic(name, layer, target)
    kind, reason = deployed_kind(layer, target)
    op = next(v for t, v in _OPS.items() if isinstance(layer, t))
    geometry = {}
    if op.startswith("conv"):
        geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        if op.startswith("conv_transpose"):
            geometry["output_padding"] = layer.output_padding
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().clone()
    smooth = getattr(layer, "smooth_scale", None)
    common = dict(name=name, type=type(layer).__name__, op=op, weight_shape=tuple(layer.weight.shape),
                  geometry=geometry, smooth_scale=None if smooth is None else smooth.detach().clone())
    wq = layer.weight_quantizer
    if wq is None:
        return LayerRecord(kind=kind, reason=reason, bias=bias, **common)
    if (wq.levels if isinstance(wq.spec, LevelSpec) else wq.scale) is None:  # a model still in training
        return LayerRecord(kind=Kind.SIMULATED, reason="weight grid not fitted", bias=bias, **common)
    view = layer.weight_view()
    spec, scale, zero_point = wq.spec, wq.scale, wq.zero_point
    if isinstance(spec, LevelSpec):
        return LayerRecord(kind=kind, reason=reason, weight_spec=spec, qweight=integer_weight(view, wq),
                           levels=wq.levels.detach().clone(), boundaries=wq.boundaries.detach().clone(), bias=bias,
                           **common)
    qweight = integer_weight(view, wq)
    narrowed_from, note = None, ""
    if kind in INTEGER_KINDS or name in dict(target.weight_bits):
        bits, note = _narrowing(name, layer, qweight, target)
        if bits is not None:
            narrowed_from, spec = spec.bits, replace(spec, bits=bits)
            scale, zero_point = weight_qparams(view.detach(), spec, wq.recipe.method, wq.name)
            qweight = integer_weight(view, wq, spec, scale, zero_point)
    per_token = kind is Kind.INTEGER_DYNAMIC and per_token_u8(layer.input_quantizer)
    record = dict(kind=kind, reason=reason or note, per_token=per_token, weight_spec=spec, qweight=qweight, w_scale=scale.detach().clone(),
                  w_zero_point=zero_point.detach().clone(), narrowed_from=narrowed_from, **common)
    if kind is Kind.INTEGER:
        xq = layer.input_quantizer
        acc = accumulator_scale(xq.scale, scale, qweight.shape[0])
        bias_q = None if bias is None else to_int32(int32_bias(bias, acc), f"layer '{name}'")
        out = None if layer.output_quantizer is None else Grid.of(layer.output_quantizer)
        return LayerRecord(input=Grid.of(xq), output=out, acc_scale=acc, bias_q=bias_q, bias=None, **record)
    return LayerRecord(bias=bias, **record)


def lower_op(name: str, op: nn.Module, target: Target) -> OpRecord:
    """The record of one quantized addition, pool, concatenation or activation product on ``target``."""
    if isinstance(op, (QuantAdd, QuantMatMul)):
        inputs = [op.a_quantizer, op.b_quantizer]
    elif isinstance(op, QuantPool):
        inputs = [op.input_quantizer]
    else:
        inputs = list(op.input_quantizers)
    output = getattr(op, "output_quantizer", None)  # a product's result stays float
    kind, reason = op_kind([*inputs, *([output] if output is not None else [])], target)
    grids = dict(inputs=tuple(Grid.of(q) for q in inputs), output=None if output is None else Grid.of(output)) \
        if kind is Kind.INTEGER else {}
    extra = {}
    if isinstance(op, QuantPool):
        extra = dict(pool=op.pool, is_global=op.is_global)
    elif isinstance(op, QuantConcat):
        extra = dict(dim=op.dim)
    elif getattr(op, "relu", False):
        extra = dict(relu=True)
    return OpRecord(name, type(op).__name__, kind, reason, **grids, **extra)


def lower(qmodel: QuantizedModel, target: Optional[Target] = None, *, calibrated: bool = True) -> Lowering:
    """One record per quantized layer and op of the calibrated ``qmodel`` on ``target`` (default:
    fewbits' own integer model, :meth:`Target.reference`). Changes nothing. ``calibrated=False``
    also lowers a model whose activation ranges are not all set (a layer without its input
    range runs simulated): its weights are all a size report needs."""
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("lower expects the model returned by fewbits.prepare")
    if calibrated:
        qmodel.require_calibrated("lower")
    target = target or Target.reference()
    layers = {name: lower_layer(name, layer, target) for name, layer in qmodel.quantized_layers().items()}
    ops = {name: lower_op(name, m, target) for name, m in qmodel.model.named_modules()
           if isinstance(m, QUANT_OPS)}
    floats = {lf.name: FloatRecord(lf.name, lf.type, lf.reason) for lf in qmodel.left_float}
    return Lowering(target, layers, ops, floats)


__all__ = ["lower", "lower_layer", "lower_op", "integer_weight", "u8_shift"]

"""The deployability rule: what each quantized layer and op becomes on a target, and why.

:func:`deployed_kind` is the only place that decides a layer's deployed form; the integer model,
the ONNX file, the packed file and the size report read its answer from the lowered records
(:func:`fewbits.lower.lower`). Layers are read through their quantizer slots only (``weight_quantizer``,
``input_quantizer``, ``output_quantizer``) and their float geometry.
"""
from __future__ import annotations

import enum

from torch import nn

from ..numerics.accumulator import accumulator_blocker
from ..spec import LevelSpec, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from ..target import Target


class Kind(enum.Enum):
    """A layer's deployed form."""

    INTEGER = "integer"  # static input grid × integer weights → int32 accumulator
    INTEGER_DYNAMIC = "integer-dynamic"  # the input grid from each batch's range (ONNX DynamicQuantizeLinear)
    WEIGHT_ONLY = "weight-only"  # integer weights, dequantized; the product is float
    DECODED = "decoded"  # non-uniform levels: float weights holding the decoded levels
    SIMULATED = "simulated"  # fake quantization as float operations, exactly the simulated layer
    FLOAT = "float"  # left float by prepare (qmodel.left_float), with its reason


INTEGER_KINDS = (Kind.INTEGER, Kind.INTEGER_DYNAMIC)


def dynamic_u8(quantizer) -> bool:
    """A per-batch grid that ONNX's DynamicQuantizeLinear computes: 256 levels, asymmetric, per
    tensor (its scale (max⁺ − min⁻)/255 and zero point −round(min⁻/s) are ``choose_qparams``')."""
    spec = quantizer.spec
    return (quantizer.recipe.dynamic and spec.bits == 8 and not spec.symmetric and not spec.narrow_range
            and isinstance(spec.granularity, PerTensor))


def per_token_u8(quantizer) -> bool:
    """A per-token grid on uint8 levels: 256 levels, asymmetric, one range per row."""
    spec = quantizer.spec
    return (quantizer.recipe.dynamic and spec.bits == 8 and not spec.symmetric and not spec.signed
            and not spec.narrow_range and isinstance(spec.granularity, PerToken))


def _output_grid_ok(quantizer, onnx: bool) -> bool:
    """A layer's own output grid the integer kinds requantize into: static, per tensor, uniform."""
    spec = quantizer.spec
    return (not quantizer.recipe.dynamic and isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerTensor)
            and quantizer.scale is not None and (not onnx or spec.qmax - spec.qmin <= 255))


def _per_output_channel(spec) -> bool:
    g = spec.granularity
    return isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)


def _dequantizable(w_spec) -> str:
    """Why integer weights on ``w_spec`` cannot sit behind ONNX's DequantizeLinear (per output
    channel, or blocked along the input — opset 21 — for per-group scales)."""
    g = w_spec.granularity
    if w_spec.bits > 8:
        return f"{w_spec.bits}-bit weights"
    if isinstance(g, PerGroup) and g.axis % 2 != 1:
        return f"per-group weight scales along axis {g.axis} (ONNX Runtime's kernels take groups along the input)"
    if isinstance(g, PerChannel) and g.axis != 0:
        return f"per-channel weights along axis {g.axis}"
    return ""


def _embedding_kind(layer: nn.Module, onnx: bool) -> tuple[Kind, str]:
    if layer.output_quantizer is not None:
        return Kind.SIMULATED, "output quantizer: runs simulated"
    if layer.max_norm is not None:
        return Kind.SIMULATED, "max_norm renormalizes rows at lookup: runs simulated"
    why = _dequantizable(layer.weight_quantizer.spec) if onnx else ""
    if why:
        return Kind.SIMULATED, why
    return Kind.WEIGHT_ONLY, "integer table rows, dequantized on lookup"


def deployed_kind(layer: nn.Module, target: Target) -> tuple[Kind, str]:
    """``(kind, reason)`` of a quantized linear / convolution / embedding layer on ``target``."""
    wq, xq, oq = layer.weight_quantizer, layer.input_quantizer, layer.output_quantizer
    onnx = target.engine == "onnxruntime"
    if wq is None:
        return Kind.SIMULATED, "no weight quantizer"
    if isinstance(wq.spec, LevelSpec):
        return Kind.DECODED, (f"{wq.spec.kind} weights: no integer kernel for non-uniform levels; float weights "
                              "holding the decoded levels")
    if isinstance(layer, nn.Embedding):
        return _embedding_kind(layer, onnx)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    if transposed and (layer.groups != 1 or len(layer.kernel_size) > 2):
        return Kind.SIMULATED, "grouped or 3-d transposed convolution: runs simulated"
    if xq is None and oq is None:
        why = _dequantizable(wq.spec) if onnx else ""
        if why:
            return Kind.SIMULATED, f"weight-only, {why}: traced as the simulated layer"
        return Kind.WEIGHT_ONLY, "weight-only: computes in float with the dequantized weights"
    if oq is not None and not _output_grid_ok(oq, onnx):
        return Kind.SIMULATED, "output quantizer other than a static per-tensor grid (of at most 256 levels for " \
                               "ONNX Runtime): runs simulated"
    if oq is not None and (xq is None or xq.recipe.dynamic):
        return Kind.SIMULATED, "an output grid after float or dynamic inputs: runs simulated"
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return Kind.SIMULATED, f"padding_mode={layer.padding_mode!r}: integer convolution pads with the zero point only"
    if onnx and xq.recipe.dynamic and per_token_u8(xq):
        if not isinstance(layer, nn.Linear):
            return Kind.SIMULATED, "per-token inputs deploy for linear layers: runs simulated"
        if not _per_output_channel(wq.spec) or wq.spec.bits > 8 or bool((wq.zero_point != 0).any()):
            return Kind.SIMULATED, "per-token inputs: symmetric per-output-channel weights of at most 8 bits"
        return Kind.INTEGER_DYNAMIC, "per-token uint8 inputs (row ranges in float) × int8 weights: MatMulInteger"
    if onnx and xq.recipe.dynamic and dynamic_u8(xq):
        if not _per_output_channel(wq.spec):
            return Kind.SIMULATED, "dynamic inputs need per-tensor or per-output-channel weights"
        if wq.spec.bits > 8 or bool((wq.zero_point != 0).any()):
            return Kind.SIMULATED, "dynamic inputs: symmetric weights of at most 8 bits"
        return Kind.INTEGER_DYNAMIC, ""
    why = accumulator_blocker(xq.spec, xq.recipe.dynamic, wq.spec)
    if why:
        return Kind.SIMULATED, why
    if xq.scale is None:
        return Kind.SIMULATED, "input range not calibrated"
    if onnx:
        xs, ws = xq.spec, wq.spec
        if xs.qmax - xs.qmin > 255:
            return Kind.SIMULATED, f"{xs.bits}-bit inputs do not fit uint8"
        if ws.bits > 8:
            return Kind.SIMULATED, f"{ws.bits}-bit weights do not fit int8"
        if bool((wq.zero_point != 0).any()):
            return Kind.SIMULATED, "asymmetric weights: ONNX Runtime's per-channel kernels need zero weight zero points"
        if transposed:
            return Kind.INTEGER, ("ONNX Runtime's CPU provider has no integer ConvTranspose: it dequantizes the "
                                  "weights and runs this product in float")
    return Kind.INTEGER, ""


def op_kind(quantizers: list, target: Target) -> tuple[Kind, str]:
    """``(kind, reason)`` of a quantized addition, pool or concatenation with these operand and
    result quantizers: integer when every one is a static per-tensor grid (of at most 256
    levels for ONNX Runtime's QLinear ops)."""
    if any(q.recipe.dynamic or not isinstance(q.spec.granularity, PerTensor) for q in quantizers):
        return Kind.SIMULATED, "dynamic or per-channel grids: runs simulated"
    if any(q.scale is None for q in quantizers):
        return Kind.SIMULATED, "ranges not calibrated"
    if target.engine == "onnxruntime" and any(q.spec.qmax - q.spec.qmin > 255 for q in quantizers):
        return Kind.SIMULATED, "grids wider than 8 bits: ONNX Runtime's QLinear ops take uint8"
    return Kind.INTEGER, ""

"""The modules torch.onnx traces: each lowered record as the standard QDQ pattern.

    x ─ [Div smooth_scale] ─ QuantizeLinear(u8) ─ DequantizeLinear ─┐
    W (int8 initializer) ─────────────────────── DequantizeLinear ─┼─ Conv / Gemm / MatMul
    b (int32 initializer, scale s_x·s_w) ──────── DequantizeLinear ─┘

which ONNX Runtime fuses into its integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat).
The quantize / dequantize calls are PyTorch's ``quantized_decomposed`` operators, which the
exporter translates to the ONNX operators above. Activations are exported as uint8 whatever
their grid's sign (a signed 8-bit grid is the same set of reals with the zero point moved by
128): on x86 without VNNI the s8×s8 kernels run about 3× slower than float.

One emitter per deployed kind (:class:`fewbits.lower.Kind`): integer and integer-dynamic layers
→ :class:`QDQLayer`; weight-only → :class:`WeightOnlyLayer` (int8 weights behind a
DequantizeLinear, float product); decoded levels → the layer with its decoded weights; simulated
→ the simulated layer itself (fake quantization as float operations); integer ops → QDQ
additions, pools and concatenations (QLinearAdd, QLinearAveragePool / QLinearGlobalAveragePool,
QLinearConcat).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..lower import Kind, Lowering, u8_shift
from ..lower.records import Grid, LayerRecord
from ..numerics.layout import expand, transposed_from_rows
from ..spec import PerGroup
from ..wrap.handle import QuantizedModel, replace_module
from ..wrap.ops import QuantAdd, QuantConcat, QuantMatMul, QuantMul, QuantPool


def _qd():
    import torch.ao.quantization.fx._decomposed  # noqa: F401 — registers quantized_decomposed ops

    return torch.ops.quantized_decomposed


@torch.library.custom_op("fewbits::dynamic_qdq_u8", mutates_args=())
def dynamic_qdq_u8(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` on the uint8 grid of its own range, as a dynamic input quantizer does
    (``choose_qparams`` + ``fake_quantize``); exported as DynamicQuantizeLinear → DequantizeLinear."""
    from ..numerics.affine import choose_qparams, fake_quantize
    from ..spec import QuantSpec

    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    lo, hi = torch.aminmax(x.detach().float())
    scale, zero_point = choose_qparams(lo, hi, spec)
    return fake_quantize(x, scale, zero_point, spec)


@dynamic_qdq_u8.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _onnx_dynamic_qdq_u8(x):
    from onnxscript import opset18 as op

    y, scale, zero_point = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(y, scale, zero_point)


_EPS = float(torch.finfo(torch.float32).eps)  # choose_qparams' floor under every scale (the ONNX form below)


@torch.library.custom_op("fewbits::per_token_linear", mutates_args=())
def per_token_linear(x: torch.Tensor, qweight_t: torch.Tensor, colsum: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ + b`` with ``x`` quantized per token on the uint8 grid of each row's own range (a
    per-token dynamic input quantizer) and ``W = qweight · w_scale`` (int8, per output channel).
    Exported as the row ranges in float, QuantizeLinear's arithmetic per row, ``MatMulInteger``
    (uint8 × int8 → int32, zero points 0) and ``y = s_row · s_w · (acc − z_row · Σ_k W_kn) + b``:
    equal to the simulated layer up to float32 rounding. ``qweight_t``: ``[in, out]``; ``colsum``:
    the integer weight summed over the inputs, per output (float)."""
    from ..numerics.affine import choose_qparams, quantize
    from ..spec import PerToken, QuantSpec

    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerToken())
    lo, hi = torch.aminmax(x.detach().float(), dim=-1, keepdim=True)
    scale, zero_point = choose_qparams(lo, hi, spec)
    q = quantize(x, scale, zero_point, spec)
    zero_point = zero_point.float()
    acc = torch.matmul(q.double(), qweight_t.double()).float()  # exact integers, as MatMulInteger's int32
    return (acc - zero_point * colsum) * (scale * w_scale) + bias


@per_token_linear.register_fake
def _(x, qweight_t, colsum, w_scale, bias):
    return x.new_empty((*x.shape[:-1], qweight_t.shape[1]))


def _onnx_per_token_linear(x, qweight_t, colsum, w_scale, bias):
    from onnxscript import FLOAT, UINT8
    from onnxscript import opset18 as op

    last = op.Constant(value_ints=[-1])
    zero = op.Constant(value_float=0.0)
    lo = op.Min(op.ReduceMin(x, last, keepdims=1), zero)
    hi = op.Max(op.ReduceMax(x, last, keepdims=1), zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=255.0)), op.Constant(value_float=_EPS))
    top = op.Constant(value_float=255.0)
    zero_point = op.Clip(op.Neg(op.Round(op.Div(lo, scale))), zero, top)
    q = op.Clip(op.Add(op.Round(op.Mul(x, op.Reciprocal(scale))), zero_point), zero, top)
    acc = op.MatMulInteger(op.Cast(q, to=UINT8.dtype), qweight_t)
    shifted = op.Sub(op.Cast(acc, to=FLOAT.dtype), op.Mul(zero_point, colsum))
    return op.Add(op.Mul(shifted, op.Mul(scale, w_scale)), bias)


def _weight_buffers(module: nn.Module, record: LayerRecord) -> None:
    """Give ``module`` the record's integer weight and per-output-channel scales and zero points
    as buffers (the initializers behind DequantizeLinear)."""
    spec = record.weight_spec
    module.register_buffer("qweight", record.layer_layout(record.qweight).to(torch.int8 if spec.signed else torch.uint8))
    module.w_axis = record.channel_axis
    w_scale, w_zero_point = record.channel_qparams()
    module.register_buffer("w_scale", w_scale)
    module.register_buffer("w_zero_point", w_zero_point)
    module.w_range = (spec.qmin, spec.qmax)


@torch.library.custom_op("fewbits::blocked_dequantize", mutates_args=())
def blocked_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], axis: int,
                       block: int, bits: int) -> torch.Tensor:
    """``(q − z) · s`` with one scale (and zero point) per ``block`` consecutive elements along
    ``axis``, the last block partial when ``block`` does not divide that dimension: ONNX's blocked
    DequantizeLinear (opset 21), with ``q`` stored in ``bits`` ≤ 4 as an int4 / uint4
    initializer (:func:`pack_int4_initializers`)."""
    grid = PerGroup(block, axis)
    levels = q.to(torch.float32)
    if zero_point is not None:
        levels = levels - expand(zero_point.to(torch.float32), tuple(q.shape), grid)
    return levels * expand(scale.to(torch.float32), tuple(q.shape), grid)


@blocked_dequantize.register_fake
def _(q, scale, zero_point, axis, block, bits):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _onnx_blocked_dequantize(q, scale, zero_point, axis: int, block: int, bits: int):
    from onnx import TensorProto
    from onnxscript import opset21 as op

    if bits <= 4:  # the int8 buffer is cast to 4 bits here; the export folds the cast into the initializer
        to = TensorProto.INT4 if q.dtype == TensorProto.INT8 else TensorProto.UINT4
        q = op.Cast(q, to=to)
        zero_point = None if zero_point is None else op.Cast(zero_point, to=to)
    if zero_point is None:
        return op.DequantizeLinear(q, scale, axis=axis, block_size=block)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block)


def blocked(record: LayerRecord) -> bool:
    """A weight-only record with per-group scales: it exports behind a blocked DequantizeLinear
    (opset 21)."""
    return record.kind is Kind.WEIGHT_ONLY and isinstance(getattr(record.weight_spec, "granularity", None), PerGroup)


def pack_int4_initializers(model) -> int:
    """Fold every ``Cast`` of an integer initializer to int4 / uint4 (what
    :func:`_onnx_blocked_dequantize` writes) into a packed 4-bit initializer, two values a byte,
    as ONNX stores them. Returns how many were folded."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded, keep = 0, []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to not in (TensorProto.INT4, TensorProto.UINT4) or node.input[0] not in inits:
            keep.append(node)
            continue
        values = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64).reshape(-1)
        lo, hi = (-8, 7) if to == TensorProto.INT4 else (0, 15)
        if values.size and (values.min() < lo or values.max() > hi):
            raise ValueError(f"export_onnx: initializer {node.input[0]!r} holds values outside 4 bits "
                             f"[{int(values.min())}, {int(values.max())}]")
        nibbles = (values & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)  # the first value in the low nibble
        dims = list(inits[node.input[0]].dims)
        graph.initializer.append(helper.make_tensor(node.output[0], to, dims, packed.tobytes(), raw=True))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        unused = [i for i in graph.initializer if i.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    return folded


def u8_grid(grid: Grid) -> tuple:
    """(scale, uint8 zero point, real clamp or None) of a static per-tensor activation grid: a grid
    narrower than uint8 clamps first; the bounds are grid points, so clamping the real value
    before rounding equals clamping the level after it."""
    spec = grid.spec
    if spec.qmax - spec.qmin > 255:
        raise ValueError(f"export_onnx: a {spec.bits}-bit activation grid does not fit uint8")
    shift = u8_shift(spec)
    zero_point = grid.zero_point + shift
    bounds = (spec.qmin + shift, spec.qmax + shift)
    clip = None if bounds == (0, 255) else tuple((q - zero_point) * grid.scale for q in bounds)
    return grid.scale, zero_point, clip


def _qdq(x: torch.Tensor, grid: tuple) -> torch.Tensor:
    """QuantizeLinear → DequantizeLinear on a uint8 grid from :func:`u8_grid`."""
    qd = _qd()
    scale, zero_point, clip = grid
    if clip is not None:
        x = x.clamp(*clip)
    q = qd.quantize_per_tensor(x, scale, zero_point, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor(q, scale, zero_point, 0, 255, torch.uint8)



_CONVS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d, "conv_transpose1d": F.conv_transpose1d,
          "conv_transpose2d": F.conv_transpose2d}


class QDQLayer(nn.Module):
    """A linear / convolution layer as QuantizeLinear → DequantizeLinear → op (see module doc)."""

    def __init__(self, record: LayerRecord) -> None:
        super().__init__()
        self.name = record.name
        self.dynamic = record.kind is Kind.INTEGER_DYNAMIC
        self.per_token = record.per_token
        self.x_scale, self.x_zero_point, self.clip = (1.0, 0, None) if self.dynamic else u8_grid(record.input)
        _weight_buffers(self, record)  # zero points are all zero here (deployed_kind)
        self.register_buffer("bias", record.bias)  # dynamic: no input scale before the call, a float bias
        self.register_buffer("bias_q", record.bias_q)
        self.register_buffer("bias_scale", None if record.bias_q is None else record.acc_scale.float())
        self.register_buffer("smooth_scale", record.smooth_scale)
        self.out = None if record.output is None else u8_grid(record.output)  # its own output grid
        self.kind = "linear" if record.op == "linear" else "conv"
        if self.kind == "conv":
            self.conv = _CONVS[record.op]
            self.geometry = dict(record.geometry)  # stride, padding, dilation, groups (, output_padding)

        if self.per_token:  # symmetric int8 weights (deployed_kind), [in, out] for MatMulInteger
            self.register_buffer("qweight_t", self.qweight.t().contiguous())
            self.register_buffer("colsum", self.qweight.sum(1, dtype=torch.int64).float())
            if self.bias is None:
                self.bias = torch.zeros(record.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        if self.per_token:
            return torch.ops.fewbits.per_token_linear(x, self.qweight_t, self.colsum, self.w_scale, self.bias)
        if self.dynamic:
            x = torch.ops.fewbits.dynamic_qdq_u8(x)
        else:
            x = _qdq(x, (self.x_scale, self.x_zero_point, self.clip))
        w = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero_point, self.w_axis, *self.w_range,
                                      torch.int8)
        b = self.bias
        if self.bias_q is not None:
            b = qd.dequantize_per_channel(self.bias_q, self.bias_scale, torch.zeros_like(self.bias_q, dtype=torch.int64),
                                          0, -(2**31), 2**31 - 1, torch.int32)
        if self.kind == "linear":
            y = F.linear(x, w, b)
        else:
            y = self.conv(x, w, b, **self.geometry)
        return y if self.out is None else _qdq(y, self.out)


class WeightOnlyLayer(nn.Module):
    """Integer weights behind DequantizeLinear; the layer computes in float (its ``compute``).

    Per-group weights sit behind a blocked DequantizeLinear (4-bit and narrower as int4): a
    linear layer's transposed, ``[in, out]`` blocked along the input and fed straight to a
    MatMul, which ONNX Runtime fuses into its 4-bit kernel (``MatMulNBits``); a convolution's in
    the quantizer's view ``[out, in·k…]``, reshaped to the layer's weight; an embedding gathers
    the integer rows and their scales, then dequantizes only those."""

    def __init__(self, record: LayerRecord, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer  # its float op (geometry, padding); its own weight and bias are not used
        self.register_buffer("bias", record.bias)
        self.register_buffer("smooth_scale", record.smooth_scale)
        self.embedding = record.op == "embedding"
        self.blocked = blocked(record)
        if self.blocked:
            self._blocked_buffers(record)
            return
        _weight_buffers(self, record)
        if self.embedding and not bool(self.w_zero_point.any()):
            self.w_zero_point = None  # symmetric table: no zero points in the file

    def _blocked_buffers(self, record: LayerRecord) -> None:
        spec = record.weight_spec
        self.group, self.bits = spec.granularity.size, spec.bits
        self.weight_shape, self.transposed = tuple(record.weight_shape), record.transposed  # the layer's layout
        self.conv_groups = record.geometry.get("groups", 1)
        dtype = torch.int8 if spec.signed else torch.uint8
        q, s, z = record.qweight.to(dtype), record.w_scale.float(), record.w_zero_point
        z = None if (spec.symmetric and spec.signed) or not bool(z.any()) else z.to(dtype)
        self.linear = record.op == "linear"
        if self.linear:  # [in, out] blocked along axis 0: the MatMul's second factor
            q, s, z = q.t().contiguous(), s.t().contiguous(), None if z is None else z.t().contiguous()
        self.register_buffer("qweight", q)
        self.register_buffer("w_scale", s)
        self.register_buffer("w_zero_point", z)

    def _blocked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            rows = self.qweight[x].to(torch.float32)
            grid = PerGroup(self.group, -1)
            if self.w_zero_point is not None:
                rows = rows - expand(self.w_zero_point[x].to(torch.float32), tuple(rows.shape), grid)
            return rows * expand(self.w_scale[x], tuple(rows.shape), grid)
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        axis = 0 if self.linear else 1
        w = torch.ops.fewbits.blocked_dequantize(self.qweight, self.w_scale, self.w_zero_point, axis, self.group,
                                                  self.bits)
        if self.linear:
            # a 2-d input goes through the product as [1, rows, in]: ONNX Runtime turns a 2-d
            # MatMul + Add (+ ReLU) into a float Gemm before its 4-bit fusion could see it
            y = torch.matmul(x.unsqueeze(0), w).squeeze(0) if x.dim() == 2 else torch.matmul(x, w)
            return y if self.bias is None else y + self.bias
        w = (transposed_from_rows(w, self.weight_shape, self.conv_groups) if self.transposed
             else w.reshape(self.weight_shape))
        return self.layer.compute(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked:
            return self._blocked_forward(x)
        qd = _qd()
        dtype = self.qweight.dtype
        if self.embedding:  # gather integer rows, then dequantize only those (cheap per call)
            rows = self.qweight[x].to(torch.float32)
            if self.w_zero_point is not None:
                rows = rows - self.w_zero_point[x].unsqueeze(-1).to(torch.float32)
            return rows * self.w_scale[x].unsqueeze(-1)
        w = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero_point, self.w_axis, *self.w_range, dtype)
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        return self.layer.compute(x, w, self.bias)


class QDQAdd(nn.Module):
    """A quantized addition as DequantizeLinear ×2 → Add → QuantizeLinear (ORT: QLinearAdd)."""

    def __init__(self, record) -> None:
        super().__init__()
        self.grids = [u8_grid(g) for g in (*record.inputs, record.output)]
        self.relu = record.relu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb, go = self.grids
        s = _qdq(a, ga) + _qdq(b, gb)
        return _qdq(torch.relu(s) if self.relu else s, go)


@torch.library.custom_op("fewbits::global_avg_pool", mutates_args=())
def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """The mean over every axis after the channel axis, kept as size 1 (ONNX GlobalAveragePool;
    torch.onnx writes adaptive pooling to size 1 as ReduceMean, which ORT runs in float only)."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@global_avg_pool.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:2], *([1] * (x.dim() - 2))))


def _onnx_global_avg_pool(x):
    from onnxscript import opset18 as op

    return op.GlobalAveragePool(x)

class QDQPool(nn.Module):
    """Quantized average pooling as DequantizeLinear → (Global)AveragePool → QuantizeLinear
    (ORT: QLinearGlobalAveragePool / QLinearAveragePool)."""

    def __init__(self, record) -> None:
        super().__init__()
        self.pool, self.is_global = record.pool, record.is_global
        self.grids = [u8_grid(g) for g in (*record.inputs, record.output)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gi, go = self.grids
        x = _qdq(x, gi)
        return _qdq(global_avg_pool(x) if self.is_global else self.pool(x), go)


class QDQConcat(nn.Module):
    """Quantized concatenation as DequantizeLinear ×n → Concat → QuantizeLinear (ORT: QLinearConcat)."""

    def __init__(self, record) -> None:
        super().__init__()
        self.dim = record.dim
        self.grids = [u8_grid(g) for g in record.inputs]
        self.out = u8_grid(record.output)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return _qdq(torch.cat([_qdq(x, g) for x, g in zip(xs, self.grids)], self.dim), self.out)


class QDQMul(QDQAdd):
    """QDQ operands → Mul → QDQ: ONNX Runtime's QLinearMul."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb, go = self.grids
        return _qdq(_qdq(a, ga) * _qdq(b, gb), go)


class QDQMatMul(nn.Module):
    """Both operands QuantizeLinear → DequantizeLinear, then MatMul: ONNX Runtime runs it on its
    integer kernel (QLinearMatMul / MatMulIntegerToFloat)."""

    def __init__(self, record) -> None:
        super().__init__()
        self.grids = [u8_grid(g) for g in record.inputs]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb = self.grids
        return torch.matmul(_qdq(a, ga), _qdq(b, gb))


_OP_EMITTERS = {QuantAdd.__name__: QDQAdd, QuantMul.__name__: QDQMul, QuantPool.__name__: QDQPool,
                QuantConcat.__name__: QDQConcat, QuantMatMul.__name__: QDQMatMul}  # by OpRecord.type


def export_module(qmodel: QuantizedModel, lowering: Lowering) -> nn.Module:
    """The copy of ``qmodel``'s network that torch.onnx traces, one emitter per record's kind."""
    work = copy.deepcopy(qmodel.model)
    for name, record in lowering.ops.items():
        if record.kind is Kind.INTEGER:
            replace_module(work, name, _OP_EMITTERS[record.type](record))
    layers = dict(work.named_modules())
    for name, record in lowering.layers.items():
        layer = layers[name]
        if record.kind in (Kind.INTEGER, Kind.INTEGER_DYNAMIC):
            replace_module(work, name, QDQLayer(record))
        elif record.kind is Kind.DECODED:
            with torch.no_grad():
                layer.weight.copy_(record.dequantized_weight())
            layer.weight_quantizer = None
        elif record.kind is Kind.WEIGHT_ONLY:
            replace_module(work, name, WeightOnlyLayer(record, layer))
    return work.eval()

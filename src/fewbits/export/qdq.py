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

import torch
from torch import nn
from torch.nn import functional as F

from ..lower import Kind, Lowering, u8_shift
from ..lower.records import Grid, LayerRecord
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
    """Integer weights behind DequantizeLinear; the layer computes in float (its ``compute``)."""

    def __init__(self, record: LayerRecord, layer: nn.Module) -> None:
        super().__init__()
        _weight_buffers(self, record)
        self.layer = layer  # its float op (geometry, padding); its own weight and bias are not used
        self.register_buffer("bias", record.bias)
        self.register_buffer("smooth_scale", record.smooth_scale)
        self.embedding = record.op == "embedding"
        if self.embedding and not bool(self.w_zero_point.any()):
            self.w_zero_point = None  # symmetric table: no zero points in the file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

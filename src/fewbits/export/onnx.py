"""ONNX export in QDQ format, hardware-aware, with a parity check against the integer model.

``export_onnx(qmodel, example_inputs, path)`` builds an export copy of the calibrated model in
which every layer the integer model runs on integers becomes the standard QDQ pattern::

    x ─ [Div smooth_scale] ─ QuantizeLinear(u8) ─ DequantizeLinear ─┐
    W (int8 initializer) ─────────────────────── DequantizeLinear ─┼─ Conv / Gemm / MatMul
    b (int32 initializer, scale s_x·s_w) ──────── DequantizeLinear ─┘

which ONNX Runtime fuses into its integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat).
``torch.onnx`` (the ``torch.export`` based exporter) writes the graph; the quantize /
dequantize calls are PyTorch's ``quantized_decomposed`` operators, which it translates to the
ONNX operators above. Activations are exported as uint8 whatever their grid's sign (a signed
8-bit grid is the same set of reals with the zero point moved by 128): on x86 without VNNI the
s8×s8 kernels run about 3× slower than float.

Hardware: on x86 with AVX2 (or AVX-512BW) but no VNNI, ONNX Runtime's u8×s8 kernels multiply
with ``vpmaddubsw``, which adds two neighbouring u8·s8 products in int16 *with saturation*. A sum
``a₁w₁ + a₂w₂`` with ``a ≤ 255`` is exact iff it stays within [-32768, 32767]; for weights in
[-64, 64] it always does (255·128 = 32640). :func:`int8_kernel_profile` detects the instruction
set; a layer whose weights are not provably within that bound (any pair of its two largest
positive or negative weights of an output channel times the input's top level) gets its weights
re-quantized to the 7-bit range before export, and the choice is reported per layer. Depthwise
convolutions are exempt: ONNX Runtime's depthwise kernel sums in int32. The
integer reference that :func:`verify` compares against is built from the same narrowed model.

Layers that have no integer kernel here (weight-only, per-group weights, more than 8 bits,
output quantizers) are exported as what they compute: weight-only layers keep
int8 weights behind a DequantizeLinear and compute in float; the others are traced as the
simulated layer itself (fake quantization as float operations). Layers with dynamic 8-bit
asymmetric input ranges quantize through DynamicQuantizeLinear (mode ``int8-dynamic``). Every
layer's mode is listed in the :class:`ExportResult`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..files import write_atomic
from ..spec import LevelSpec, PerChannel, PerGroup, PerTensor
from ..wrap.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, int32_accumulator_blocker
from ..wrap.prepare import QuantizedModel, Status, _replace

EXPORT_FORMAT, EXPORT_VERSION = "fewbits.onnx", "1.0"
OPSET = 18  # the torch.export based exporter's lowest; ONNX Runtime 1.17+ runs it
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
NARROW_BITS = 7
WEIGHT_MODES = ("auto", "full", "narrow")


# ---- the CPU's int8 kernels ------------------------------------------------------------------
@dataclass(frozen=True)
class KernelProfile:
    """What the int8 GEMM kernels of ONNX Runtime do on this CPU.

    ``pair_saturation``: u8×s8 products are summed in pairs into int16 with saturation
    (x86 AVX2 / AVX-512BW without VNNI), so weights must be bounded for exact results.
    """

    machine: str
    isa: str
    vnni: bool
    pair_saturation: bool

    def describe(self) -> str:
        if self.pair_saturation:
            return (f"{self.isa} without VNNI: u8×s8 pairs saturate in int16, weights kept within "
                    f"±{2**(NARROW_BITS - 1)} where not provably exact")
        return f"{self.isa}: int8 kernels accumulate exactly, full weight range"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def int8_kernel_profile(flags: Optional[set[str]] = None, machine: Optional[str] = None) -> KernelProfile:
    """Detect the instruction set that decides whether u8×s8 kernels saturate (``flags``:
    the ``/proc/cpuinfo`` flags, read when not given)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return KernelProfile(machine, machine, vnni=False, pair_saturation=False)
    flags = _cpu_flags() if flags is None else set(flags)
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    isa = "avx512bw" if "avx512bw" in flags else "avx2" if "avx2" in flags else "sse4.1" if "sse4_1" in flags else "x86"
    if vnni:
        isa += "+vnni"
    return KernelProfile(machine, isa, vnni, pair_saturation=not vnni and isa in ("avx2", "avx512bw"))


def pair_sum_bound(qweight: torch.Tensor, x_max_level: int) -> tuple[int, int]:
    """The extreme int16 pair sums ``a₁w₁ + a₂w₂`` any input levels in [0, x_max_level] can make
    with two weights of one output channel (whatever pairs the kernel forms)."""
    w = qweight.reshape(qweight.shape[0], -1).to(torch.int64)
    k = min(2, w.shape[1])
    pos = w.clamp_min(0).topk(k, dim=1).values.sum(1).max().item()
    neg = (-w).clamp_min(0).topk(k, dim=1).values.sum(1).max().item()
    return -neg * x_max_level, pos * x_max_level


# ---- per-layer decisions ---------------------------------------------------------------------
@dataclass
class LayerExport:
    """How one quantized layer went into the ONNX file."""

    name: str
    mode: str  # "int8" | "int8-dynamic" | "weight-only" | "decoded" | "simulated"
    weight_bits: Optional[int] = None
    narrowed_from: Optional[int] = None  # original weight bits when the CPU profile narrowed them
    reason: str = ""


def _dynamic_u8(quantizer) -> bool:
    """A per-batch grid that ONNX's DynamicQuantizeLinear computes: 256 levels, asymmetric, per
    tensor (its scale (max⁺ − min⁻)/255 and zero point −round(min⁻/s) are ``choose_qparams``')."""
    spec = quantizer.spec
    return (quantizer.recipe.dynamic and spec.bits == 8 and not spec.symmetric and not spec.narrow_range
            and isinstance(spec.granularity, PerTensor))


def _int8_blocker(layer: nn.Module) -> str:
    """Why ``layer`` cannot be a QDQ integer layer; empty when it can."""
    xq = layer.input_quantizer
    if xq is not None and xq.recipe.dynamic and _dynamic_u8(xq):
        wq = layer.weight_quantizer
        g = None if wq is None else wq.spec.granularity
        if wq is None or not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
            return "dynamic inputs need per-tensor or per-output-channel weights"
        if wq.spec.bits > 8 or bool((wq.zero_point != 0).any()) or layer.output_quantizer is not None:
            return "dynamic inputs: symmetric weights of at most 8 bits, no output quantizer"
        return ""
    why = int32_accumulator_blocker(layer.input_quantizer, layer.weight_quantizer)
    if why:
        return why
    if layer.output_quantizer is not None:
        return "output quantizer: traced as the simulated layer"
    xs, ws = layer.input_quantizer.spec, layer.weight_quantizer.spec
    if xs.qmax - xs.qmin > 255:
        return f"{xs.bits}-bit inputs do not fit uint8"
    if ws.bits > 8:
        return f"{ws.bits}-bit weights do not fit int8"
    if bool((layer.weight_quantizer.zero_point != 0).any()):
        return "asymmetric weights: ONNX Runtime's per-channel kernels need zero weight zero points"
    if isinstance(layer, (QuantConv1d, QuantConv2d)) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}"
    return ""


def _weight_only_blocker(layer: nn.Module) -> str:
    wq = layer.weight_quantizer
    if wq is None:
        return "no weight quantizer"
    if layer.input_quantizer is not None or layer.output_quantizer is not None:
        return "activation quantizers"
    g = wq.spec.granularity
    if wq.spec.bits > 8:
        return f"{wq.spec.bits}-bit weights"
    if isinstance(g, PerGroup):
        return "per-group weight scales (needs opset 21 blocked DequantizeLinear)"
    if isinstance(g, PerChannel) and g.axis != 0:
        return f"per-channel weights along axis {g.axis}"
    return ""


def u8_shift(spec) -> int:
    """What moves an activation grid onto uint8 levels (signed grids: the zero point too)."""
    return 128 if spec.signed and spec.bits == 8 else max(0, -spec.qmin)


def _input_top_level(layer: nn.Module) -> int:
    xs = layer.input_quantizer.spec
    return xs.qmax + u8_shift(xs)


def _integer_weight(layer: nn.Module) -> torch.Tensor:
    from ..numerics.affine import quantize

    wq = layer.weight_quantizer
    return quantize(layer._weight_view().detach(), wq.scale, wq.zero_point, wq.spec)


def _depthwise(layer: nn.Module) -> bool:
    """ONNX Runtime runs these with its depthwise kernel, which sums in int32 (measured here:
    full-range weights leave the levels after depthwise layers exact; tested)."""
    return isinstance(layer, (QuantConv1d, QuantConv2d)) and layer.groups == layer.in_channels == layer.out_channels


def plan_layers(qmodel: QuantizedModel, profile: KernelProfile, weights: str = "auto") -> list[LayerExport]:
    """Each quantized layer's export mode and weight width on ``profile`` (changes nothing)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    plan = []
    for name, layer in qmodel.quantized_layers().items():
        for slot in ("input", "output"):
            quantizer = getattr(layer, f"{slot}_quantizer", None)
            if quantizer is not None and quantizer.recipe.dynamic and not (slot == "input" and _dynamic_u8(quantizer)):
                raise ValueError(f"export_onnx: layer '{name}' quantizes its {slot} dynamically on a grid ONNX's "
                                 "DynamicQuantizeLinear does not compute (8-bit asymmetric per tensor inputs only)")
        wq = layer.weight_quantizer
        if wq is not None and isinstance(wq.spec, LevelSpec):
            plan.append(LayerExport(name, "decoded", wq.spec.bits, reason=f"{wq.spec.kind} weights: no integer "
                                    "kernel for non-uniform levels; float weights holding the decoded levels"))
            continue
        if isinstance(layer, QuantEmbedding):
            why = _weight_only_blocker(layer)
            plan.append(LayerExport(name, "simulated" if why else "weight-only",
                                    None if why else layer.weight_quantizer.spec.bits, reason=why))
            continue
        why = _int8_blocker(layer)
        if why:
            wo = _weight_only_blocker(layer)
            mode = "weight-only" if not wo else "simulated"
            plan.append(LayerExport(name, mode, layer.weight_quantizer.spec.bits if mode == "weight-only" else None,
                                    reason=why))
            continue
        bits = layer.weight_quantizer.spec.bits
        entry = LayerExport(name, "int8-dynamic" if layer.input_quantizer.recipe.dynamic else "int8", bits)
        check = weights == "narrow" or (weights == "auto" and profile.pair_saturation and not _depthwise(layer))
        if check:
            lo, hi = pair_sum_bound(_integer_weight(layer), _input_top_level(layer))
            exact = INT16_MIN <= lo and hi <= INT16_MAX
            if bits > NARROW_BITS and (weights == "narrow" or not exact):
                entry.weight_bits, entry.narrowed_from = NARROW_BITS, bits
                entry.reason = (f"weight pairs reach [{lo}, {hi}] beyond int16: re-quantized to {NARROW_BITS} bits"
                                if weights == "auto" else f"weights='narrow': re-quantized to {NARROW_BITS} bits")
            else:
                entry.reason = f"{bits}-bit weights kept: pair sums within [{lo}, {hi}]"
        elif weights == "auto" and profile.pair_saturation:
            entry.reason = f"{bits}-bit weights kept: depthwise, ONNX Runtime's depthwise kernel sums in int32"
        plan.append(entry)
    return plan


@torch.no_grad()
def narrowed(qmodel: QuantizedModel, plan: Sequence[LayerExport]) -> QuantizedModel:
    """A copy of ``qmodel`` whose layers the plan narrowed use that many weight bits (same
    scheme, qparams from the weights again); ``qmodel`` itself is unchanged."""
    todo = {e.name: e.weight_bits for e in plan if e.narrowed_from is not None}
    if not todo:
        return qmodel
    out = copy.deepcopy(qmodel)
    layers = out.quantized_layers()
    for name, bits in todo.items():
        wq = layers[name].weight_quantizer
        wq.recipe = replace(wq.recipe, spec=replace(wq.spec, bits=bits))
        wq.set_from(layers[name]._weight_view())
    return out


# ---- the modules that torch.onnx traces ------------------------------------------------------
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


def _hold_integer_weight(module: nn.Module, layer: nn.Module) -> None:
    """Give ``module`` the layer's integer weight and per-output-channel scales and zero points
    as buffers (the initializers behind DequantizeLinear)."""
    wq = layer.weight_quantizer
    qw = _integer_weight(layer).reshape(layer.weight.shape)
    channels = qw.shape[0]
    module.register_buffer("qweight", qw.to(torch.int8 if wq.spec.signed else torch.uint8))
    module.register_buffer("w_scale", wq.scale.detach().float().reshape(-1).expand(channels).contiguous())
    module.register_buffer("w_zero_point",
                           wq.zero_point.detach().reshape(-1).expand(channels).to(torch.int64).contiguous())
    module.w_range = (wq.spec.qmin, wq.spec.qmax)


def _qdq(x: torch.Tensor, grid: tuple) -> torch.Tensor:
    """QuantizeLinear → DequantizeLinear on a uint8 grid from :func:`_u8_grid`."""
    qd = _qd()
    scale, zero_point, clip = grid
    if clip is not None:
        x = x.clamp(*clip)
    q = qd.quantize_per_tensor(x, scale, zero_point, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor(q, scale, zero_point, 0, 255, torch.uint8)


class _QDQLayer(nn.Module):
    """A linear / convolution layer as QuantizeLinear → DequantizeLinear → op (see module doc)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        xq, wq = layer.input_quantizer, layer.weight_quantizer
        # A grid narrower than uint8 clamps first; the bounds are grid points, so clamping the
        # real value before rounding equals clamping the level after it.
        self.dynamic = xq.recipe.dynamic
        self.x_scale, self.x_zero_point, self.clip = (1.0, 0, None) if self.dynamic else _u8_grid(xq)
        self.name = wq.name.rpartition(".")[0]
        _hold_integer_weight(self, layer)  # zero points are all zero here (_int8_blocker)
        if layer.bias is not None and self.dynamic:  # no input scale before the call: a float bias
            self.bias_q = None
            self.register_buffer("bias", layer.bias.detach().clone())
        elif layer.bias is not None:
            acc = torch.tensor(self.x_scale, dtype=torch.float64) * self.w_scale.double()
            self.register_buffer("bias_q", torch.round(layer.bias.detach().double() / acc).to(torch.int32))
            self.register_buffer("bias_scale", acc.float())
        else:
            self.bias_q = None
        self.register_buffer("smooth_scale", getattr(layer, "smooth_scale", None))
        self.kind = "linear" if isinstance(layer, QuantLinear) else "conv"
        if self.kind == "conv":
            self.conv = F.conv1d if isinstance(layer, QuantConv1d) else F.conv2d
            self.geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        if self.dynamic:
            x = torch.ops.fewbits.dynamic_qdq_u8(x)
        else:
            x = _qdq(x, (self.x_scale, self.x_zero_point, self.clip))
        w = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero_point, 0, *self.w_range, torch.int8)
        b = getattr(self, "bias", None)
        if self.bias_q is not None:
            b = qd.dequantize_per_channel(self.bias_q, self.bias_scale, torch.zeros_like(self.bias_q, dtype=torch.int64),
                                          0, -(2**31), 2**31 - 1, torch.int32)
        if self.kind == "linear":
            return F.linear(x, w, b)
        stride, padding, dilation, groups = self.geometry
        return self.conv(x, w, b, stride, padding, dilation, groups)


class _WeightOnlyLayer(nn.Module):
    """Integer weights behind DequantizeLinear; the layer computes in float."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        _hold_integer_weight(self, layer)
        self.layer = layer  # geometry and bias; its weight is not used
        self.embedding = isinstance(layer, QuantEmbedding)
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
        w = qd.dequantize_per_channel(self.qweight, self.w_scale, self.w_zero_point, 0, *self.w_range, dtype)
        layer = self.layer
        if isinstance(layer, QuantLinear):
            if layer.smooth_scale is not None:
                x = x / layer.smooth_scale
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)


class _QDQAdd(nn.Module):
    """A quantized addition as DequantizeLinear ×2 → Add → QuantizeLinear (ORT: QLinearAdd)."""

    def __init__(self, add: nn.Module) -> None:
        super().__init__()
        self.grids = [_u8_grid(q) for q in (add.a_quantizer, add.b_quantizer, add.output_quantizer)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb, go = self.grids
        return _qdq(_qdq(a, ga) + _qdq(b, gb), go)


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


class _QDQPool(nn.Module):
    """Quantized average pooling as DequantizeLinear → (Global)AveragePool → QuantizeLinear
    (ORT: QLinearGlobalAveragePool / QLinearAveragePool)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.pool, self.is_global = op.pool, op.is_global
        self.grids = [_u8_grid(q) for q in (op.input_quantizer, op.output_quantizer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gi, go = self.grids
        x = _qdq(x, gi)
        return _qdq(global_avg_pool(x) if self.is_global else self.pool(x), go)


class _QDQConcat(nn.Module):
    """Quantized concatenation as DequantizeLinear ×n → Concat → QuantizeLinear (ORT: QLinearConcat)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.dim = op.dim
        self.grids = [_u8_grid(q) for q in op.input_quantizers]
        self.out = _u8_grid(op.output_quantizer)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return _qdq(torch.cat([_qdq(x, g) for x, g in zip(xs, self.grids)], self.dim), self.out)


def _u8_grid(quantizer) -> tuple:
    """(scale, uint8 zero point, real clamp or None) of a static per-tensor activation grid."""
    spec = quantizer.spec
    if quantizer.recipe.dynamic or quantizer.scale is None or quantizer.scale.numel() != 1 or spec.qmax - spec.qmin > 255:
        raise ValueError(f"export_onnx: '{quantizer.name}' is not a static per-tensor grid of at most 8 bits")
    shift = u8_shift(spec)
    scale, zero_point = float(quantizer.scale.reshape(())), int(quantizer.zero_point.reshape(())) + shift
    bounds = (spec.qmin + shift, spec.qmax + shift)
    clip = None if bounds == (0, 255) else tuple((q - zero_point) * scale for q in bounds)
    return scale, zero_point, clip


def export_module(qmodel: QuantizedModel, plan: Sequence[LayerExport]) -> nn.Module:
    """The copy of ``qmodel``'s network that torch.onnx traces (``plan`` from :func:`plan_layers`)."""
    from ..wrap.ops import QuantAdd, QuantConcat, QuantPool

    work = copy.deepcopy(qmodel.model)
    ops = {QuantAdd: _QDQAdd, QuantPool: _QDQPool, QuantConcat: _QDQConcat}
    for name, module in list(work.named_modules()):
        if type(module) in ops:
            _replace(work, name, ops[type(module)](module))
    layers = dict(work.named_modules())
    for entry in plan:
        layer = layers[entry.name]
        if entry.mode in ("int8", "int8-dynamic"):
            _replace(work, entry.name, _QDQLayer(layer))
        elif entry.mode == "decoded":
            with torch.no_grad():
                layer.weight.copy_(layer.quantized_weight())
            layer.weight_quantizer = None
        elif entry.mode == "weight-only":
            if isinstance(layer, QuantEmbedding) and layer.max_norm is not None:
                entry.mode, entry.reason = "simulated", "max_norm renormalizes rows at lookup"
                continue
            _replace(work, entry.name, _WeightOnlyLayer(layer))
    return work.eval()


# ---- export ----------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how each layer went in."""

    path: str
    bytes: int
    opset: int
    profile: KernelProfile
    layers: list[LayerExport]
    inputs: list[str]
    outputs: list[str]
    seconds: float
    verification: Optional["Verification"] = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.layers:
            out[e.mode] = out.get(e.mode, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "opset": self.opset, "profile": asdict(self.profile),
                "profile_note": self.profile.describe(), "modes": self.counts(),
                "narrowed": [e.name for e in self.layers if e.narrowed_from is not None],
                "layers": [asdict(e) for e in self.layers], "inputs": self.inputs, "outputs": self.outputs,
                "seconds": round(self.seconds, 2),
                "verification": None if self.verification is None else self.verification.to_dict()}


def _as_call(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError("example_inputs must be a tensor, a tuple of tensors or a dict of named tensors, "
                     f"got {type(example_inputs).__name__}")


DYNAMIC_MODES = ("auto", "batch", "all", "none")


def _dynamic(value, mode: str):
    """Which input dimensions may vary: ``"batch"`` the first, ``"all"`` every one (torch.export
    keeps fixed what the model fixes), ``"auto"`` the batch of images (float, rank ≥ 3: a fixed
    size keeps Flatten a constant reshape) and every dimension of anything else (token ids)."""
    if not isinstance(value, torch.Tensor) or mode == "none" or value.dim() == 0:
        return None
    if mode == "batch" or (mode == "auto" and torch.is_floating_point(value) and value.dim() >= 3):
        return {0: torch.export.Dim.AUTO}
    return {i: torch.export.Dim.AUTO for i in range(value.dim())}


def export_onnx(qmodel: QuantizedModel, example_inputs, path, *, batches=None, weights: str = "auto",
                verify: bool = True, strict: bool = False, tolerance: float = 1.0,
                wrap=None, dynamic: str = "auto", profile: Optional[KernelProfile] = None) -> ExportResult:
    """Write ``qmodel`` (calibrated) as a QDQ ONNX model at ``path`` and check it.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors
    (the ONNX inputs take the names of the forward's parameters). ``weights``: ``"auto"``
    (narrow to 7 bits only where this CPU's kernels would saturate), ``"full"`` (never) or
    ``"narrow"`` (always). ``wrap``: an optional ``callable(module) -> module`` selecting the
    outputs (e.g. a tensor out of a model output object). ``dynamic``: which input dimensions
    may vary at run time (``"auto"``: the batch of images, every dimension of token ids; or
    ``"batch"``, ``"all"``, ``"none"``). With ``verify`` the file is run by
    ONNX Runtime on ``batches`` (default: the example) and compared to the integer model
    (:func:`verify`); past ``tolerance`` output steps it warns, or raises with ``strict``.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ValueError("export_onnx expects the model returned by fewbits.prepare")
    qmodel.require_calibrated("export_onnx")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"export_onnx: directory {str(path.parent)!r} does not exist")
    if dynamic not in DYNAMIC_MODES:
        raise ValueError(f"dynamic must be one of {DYNAMIC_MODES}, got {dynamic!r}")
    args, kwargs = _as_call(example_inputs)
    t0 = time.perf_counter()
    profile = profile or int8_kernel_profile()
    plan = plan_layers(qmodel, profile, weights)
    target = narrowed(qmodel, plan)
    module = export_module(target, plan)
    if wrap is not None:
        module = wrap(module)
    data = _torch_onnx_bytes(module, args, kwargs, dynamic)
    import onnx

    model = onnx.load_from_string(data)
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "recipe": qmodel.recipe.to_dict(),
            "profile": asdict(profile), "layers": [asdict(e) for e in plan],
            "input_levels": _quantize_nodes(model, module)}
    for node in model.graph.node:  # the exporter's per-node stack traces: ~1.5 MB on MiniLM
        del node.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "fewbits", json.dumps(meta)
    payload = model.SerializeToString()
    write_atomic(path, payload)
    result = ExportResult(str(path), len(payload), OPSET, profile, plan,
                          [i.name for i in model.graph.input], [o.name for o in model.graph.output],
                          time.perf_counter() - t0)
    if verify:
        result.verification = verify_onnx(qmodel, path, batches if batches is not None else [example_inputs],
                                          tolerance=tolerance, wrap=wrap)
        if not result.verification.ok:
            message = f"export_onnx: {path.name} differs from the integer model: {result.verification.summary()}"
            if strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
    return result


def _quantize_nodes(model, module: nn.Module) -> dict[str, str]:
    """ONNX tensor holding each integer layer's uint8 input levels → the layer's name (the
    exporter records the module path of every node it wrote)."""
    paths = {p: m.name for p, m in module.named_modules() if isinstance(m, _QDQLayer)}
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = json.loads(props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
        except ValueError:
            continue
        # scopes: ['', 'features', 'features.0', ..., op] or ['', '0', op] at the top level
        path = scopes[-2] if len(scopes) >= 2 else ""
        if path in paths:
            found[node.output[0]] = paths[path]
    return found


def _torch_onnx_bytes(module: nn.Module, args: tuple, kwargs: dict, dynamic_mode: str = "auto") -> bytes:
    import inspect

    _qd()  # the exporter's operator registry only sees quantized_decomposed ops loaded before it
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    dynamic = {name: torch.utils._pytree.tree_map(lambda v: _dynamic(v, dynamic_mode), value)
               for name, value in bound.items()}
    # the exporter narrates each stage on stdout and logs warnings about skipped torchvision ops
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                        dynamic_shapes=dynamic, external_data=False, verbose=False,
                                        custom_translation_table={
                                            torch.ops.fewbits.dynamic_qdq_u8.default: _onnx_dynamic_qdq_u8,
                                            torch.ops.fewbits.global_avg_pool.default: _onnx_global_avg_pool})
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


# ---- running the file, and the parity check --------------------------------------------------
def _feeds(names: list[str], args: tuple, kwargs: dict, path) -> dict:
    """ONNX Runtime's input dict: keyword arguments by name, the positional ones in order."""
    flat, feeds = list(args), {}
    for name in names:
        if name in kwargs:
            feeds[name] = kwargs[name]
        elif flat:
            feeds[name] = flat.pop(0)
        else:
            raise ValueError(f"{Path(path).name}: no value for ONNX input {name!r}")
    return {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}


class OnnxModel:
    """An ONNX Runtime session called like the torch model it came from (outputs as tensors:
    one tensor, or a tuple when the graph has several outputs)."""

    def __init__(self, path, threads: int = 2, spinning: bool = False, optimized_path=None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def feeds(self, *args, **kwargs) -> dict:
        return _feeds(self.inputs, args, kwargs, self.path)

    def run(self, feeds: dict) -> list:
        return self.session.run(None, feeds)

    def __call__(self, *args, **kwargs):
        outs = [torch.from_numpy(o) for o in self.run(self.feeds(*args, **kwargs))]
        return outs[0] if len(outs) == 1 else tuple(outs)


@dataclass
class Verification:
    """ONNX Runtime vs the integer model on the same batches.

    At every integer layer's input (the uint8 levels ONNX Runtime quantized, against the levels
    the integer model computed): ``max_levels`` the largest difference, ``differing`` the share
    of levels that differ at all, ``worst_layer`` where the largest was. Two correct int8
    engines differ by a rare one-level flip where a requantized value lands within float
    rounding of a half level (ONNX Runtime rescales in float32, fewbits with a 31-bit
    fixed-point multiplier), and a flip moves later layers' inputs a little; a saturating
    kernel or a wrong grid shows as many levels. At the outputs: ``max_steps`` the largest
    difference in steps of an 8-bit grid spanning the reference output ((max − min) / 255),
    ``max_abs`` in output units.
    """

    max_levels: int
    differing: float
    worst_layer: str
    layers: int
    max_steps: float
    mean_steps: float
    max_abs: float
    batches: int
    tolerance: float
    max_differing: float
    per_layer: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_levels <= self.tolerance and self.differing <= self.max_differing

    def summary(self) -> str:
        where = f" (worst: {self.worst_layer})" if self.max_levels else ""
        return (f"{self.layers} integer layers: inputs differ by at most {self.max_levels} level(s){where}, "
                f"{self.differing:.2e} of levels differ; outputs: max {self.max_steps:.3g} output steps "
                f"(mean {self.mean_steps:.2g}, max |diff| {self.max_abs:.3g}) over {self.batches} batches; "
                f"tolerance {self.tolerance:g} level(s) on <= {self.max_differing:g} of values")

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _read_meta(path: Path) -> tuple:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 — any parse failure is a corrupt file
        raise ValueError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "fewbits" not in props:
        raise ValueError(f"{path}: no fewbits export metadata: not written by fewbits.export_onnx")
    meta = json.loads(props["fewbits"])
    if meta.get("format") != EXPORT_FORMAT or str(meta.get("version", "")).split(".")[0] != EXPORT_VERSION.split(".")[0]:
        raise ValueError(f"{path}: export metadata format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this fewbits reads {EXPORT_FORMAT} {EXPORT_VERSION}")
    return model, [LayerExport(**e) for e in meta["layers"]], meta


def _flat_tensors(value) -> list[torch.Tensor]:
    if hasattr(value, "to_tuple"):  # a transformers ModelOutput
        value = value.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def _level_probe(model, names: dict[str, str]) -> bytes:
    """The model with every integer layer's input levels as extra graph outputs."""
    import onnx

    probe = copy.deepcopy(model)
    for tensor in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    return probe.SerializeToString()


def _teacher_forcing(reference: nn.Module, wanted: set[str]):
    """Hooks on the integer layers of ``reference``: each records the uint8 levels it would
    compute for its input, then continues from the levels in ``forced`` (ONNX Runtime's), so
    every layer is compared on the same input and one kernel's difference does not spread."""
    from ..convert.layers import _IntegerLayer

    seen: dict[str, torch.Tensor] = {}
    forced: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in reference.modules():
        if isinstance(layer, _IntegerLayer) and layer.name in wanted:
            def hook(mod, args, shift=u8_shift(layer.in_spec)):
                mine = mod._input(args[0]).to(torch.int32) + shift
                if mod.name in seen:  # run twice in one call: no single input to compare
                    seen[mod.name] = None
                    return None
                seen[mod.name] = mine
                theirs = forced.get(mod.name)
                if theirs is None or theirs.shape != mine.shape:
                    return None
                return (theirs - shift, *args[1:])

            hooks.append(layer.register_forward_pre_hook(hook))
    return seen, forced, hooks


@torch.no_grad()
def verify_onnx(qmodel: QuantizedModel, onnx_path, batches, *, tolerance: float = 1.0,
                max_differing: float = 1e-3, wrap=None) -> Verification:
    """Run ``onnx_path`` in ONNX Runtime and the integer model (``fewbits.convert``) of ``qmodel``
    — narrowed as the file's metadata says — on ``batches``, and compare each integer layer's
    input levels and the outputs (see :class:`Verification`). The integer model is teacher-
    forced: every layer continues from ONNX Runtime's input levels, so a difference is charged
    to the kernel (and float island) that made it instead of every layer after it.
    ``tolerance``: level difference allowed; ``max_differing``: share of levels allowed to differ."""
    import onnxruntime as ort

    from ..convert import convert

    path = Path(onnx_path)
    model, plan, meta = _read_meta(path)
    if {e.name for e in plan} != set(qmodel.quantized_layers()):
        raise ValueError(f"{path.name} was exported from a model with other quantized layers than this one")
    probes = meta.get("input_levels", {})
    reference = convert(narrowed(qmodel, plan))
    runner = reference.model if wrap is None else wrap(reference.model)
    seen, forced, hooks = _teacher_forcing(reference.model, set(probes.values()))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(_level_probe(model, probes), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    n_out = len(model.graph.output)
    worst_steps, total, count, worst_abs, n_batches = 0.0, 0.0, 0, 0.0, 0
    per_layer: dict[str, list] = {}
    try:
        for batch in batches:
            args, kwargs = _as_call(batch)
            got = session.run(None, _feeds(input_names, args, kwargs, path))
            seen.clear()
            forced.clear()
            forced.update({layer: torch.from_numpy(got[n_out + i].astype("int32"))
                           for i, layer in enumerate(probes.values())})
            ref = _flat_tensors(runner(*args, **kwargs))
            if n_out != len(ref):
                raise ValueError(f"{path.name} has {n_out} outputs, the model returns {len(ref)}")
            for i, (r, o) in enumerate(zip(ref, got[:n_out])):
                r, o = r.float(), torch.from_numpy(o).float()
                if o.shape != r.shape:
                    raise ValueError(f"{path.name}: output {i} has shape {tuple(o.shape)}, the model gives {tuple(r.shape)}")
                step = float(r.max() - r.min()) / 255 or 1.0
                diff = (o - r).abs()
                worst_abs = max(worst_abs, float(diff.max()))
                worst_steps = max(worst_steps, float((diff / step).max()))
                total += float((diff / step).sum())
                count += diff.numel()
            for layer, mine in seen.items():
                theirs = forced.get(layer)
                if mine is None or theirs is None or theirs.shape != mine.shape:
                    continue
                d = (theirs - mine).abs()
                stats = per_layer.setdefault(layer, [0, 0, 0])
                stats[0] = max(stats[0], int(d.max()))
                stats[1] += int((d > 0).sum())
                stats[2] += d.numel()
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("verify: no batches")
    max_levels = max((v[0] for v in per_layer.values()), default=0)
    worst_layer = max(per_layer, key=lambda k: per_layer[k][0], default="")
    differing = sum(v[1] for v in per_layer.values()) / max(sum(v[2] for v in per_layer.values()), 1)
    return Verification(max_levels, differing, worst_layer, len(per_layer), worst_steps, total / max(count, 1),
                        worst_abs, n_batches, tolerance, max_differing,
                        {k: {"max_levels": v[0], "differing": v[1] / max(v[2], 1)} for k, v in per_layer.items()})


verify = verify_onnx  # the public name; export_onnx's ``verify`` flag shadows it there


def onnx_available() -> Optional[str]:
    """Why ONNX export cannot run here (a missing package), or None."""
    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            return f"ONNX export needs {package}: pip install 'fewbits[onnx]'"
    return None


__all__ = ["export_onnx", "verify", "verify_onnx", "OnnxModel", "ExportResult", "Verification", "LayerExport",
           "KernelProfile", "int8_kernel_profile", "pair_sum_bound", "plan_layers", "narrowed", "export_module",
           "onnx_available"]

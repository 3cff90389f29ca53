"""The lowered records: one frozen record per quantized layer and per quantized op.

A record holds everything an emitter needs — the deployed kind and why, the integer weight, its
scales and zero points, the input grid, the int32 bias and the accumulator scale, the SmoothQuant
divisor, the geometry, the narrowing applied — so that the integer model, the ONNX file, the
packed file and the size report are built from the records and never from a simulated layer's
insides. :func:`fewbits.lower.lower` makes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..numerics.affine import dequantize, quantize
from ..numerics.layout import transposed_from_rows
from ..numerics.levels import decode
from ..spec import LevelSpec, QuantSpec, TernarySpec
from .kinds import Kind


@dataclass(frozen=True)
class Grid:
    """A static per-tensor activation grid: ``x ≈ scale · (q − zero_point)``, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    spec: QuantSpec

    @classmethod
    def of(cls, quantizer) -> "Grid":
        return cls(float(quantizer.scale.reshape(())), int(quantizer.zero_point.reshape(())), quantizer.spec)

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, torch.tensor(self.scale), torch.tensor(self.zero_point), self.spec).to(torch.int32)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        return ((levels.to(torch.int64) - self.zero_point).to(torch.float64) * self.scale).to(torch.float32)


@dataclass(frozen=True, eq=False)
class LayerRecord:
    """One quantized layer as it deploys (see the module docstring).

    ``qweight``: the weight's integer levels in the quantizer's view (``[out, in·k…]`` for a
    convolution; level *indices* for non-uniform grids), ``None`` without a weight quantizer.
    ``w_scale`` / ``w_zero_point``: the qparams in the quantizer's own shape (per group:
    ``[out, groups]``). ``input``: the static input grid of integer layers. ``acc_scale``: ``s_x·s_w``
    per output channel (float64), ``bias_q`` the int32 bias on it; ``bias`` the float bias the
    other kinds add. ``narrowed_from``: the recipe's weight width when the target narrowed it.
    """

    name: str
    type: str
    op: str  # "linear" | "conv1d" | "conv2d" | "conv3d" | "conv_transpose1d" | "conv_transpose2d" | "embedding"
    kind: Kind
    reason: str
    weight_shape: tuple
    weight_spec: Optional[object] = None
    qweight: Optional[torch.Tensor] = None
    w_scale: Optional[torch.Tensor] = None
    w_zero_point: Optional[torch.Tensor] = None
    levels: Optional[torch.Tensor] = None  # non-uniform grids: the level table
    boundaries: Optional[torch.Tensor] = None
    input: Optional[Grid] = None
    output: Optional[Grid] = None  # integer layers with their own output grid (requantized into it)
    acc_scale: Optional[torch.Tensor] = None
    bias_q: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    smooth_scale: Optional[torch.Tensor] = None
    geometry: dict = field(default_factory=dict)
    narrowed_from: Optional[int] = None
    per_token: bool = False  # integer-dynamic with one input grid per token

    @property
    def weight_bits(self) -> Optional[int]:
        return None if self.weight_spec is None else self.weight_spec.bits

    @property
    def transposed(self) -> bool:
        """A transposed convolution: its weight is ``[in, out/groups, *kernel]``."""
        return self.op.startswith("conv_transpose")

    @property
    def channels(self) -> int:
        """Output channels (rows of the quantizer's view)."""
        if self.transposed:
            return self.weight_shape[1] * self.geometry["groups"]
        return self.weight_shape[0]

    @property
    def channel_axis(self) -> int:
        """The output-channel axis of the weight in the layer's layout."""
        return 1 if self.transposed else 0

    def layer_layout(self, view: torch.Tensor) -> torch.Tensor:
        """A tensor in the quantizer's view layout (``qweight``'s) in the layer's weight layout."""
        if not self.transposed:
            return view.reshape(self.weight_shape)
        return transposed_from_rows(view, self.weight_shape, self.geometry["groups"])

    def channel_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight scale (float32) and zero point (int64) per output channel (per-tensor or
        per-output-channel grids)."""
        c = self.channels
        return (self.w_scale.float().reshape(-1).expand(c).contiguous(),
                self.w_zero_point.reshape(-1).expand(c).to(torch.int64).contiguous())

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the simulation multiplies, rebuilt from the integers (layer shape)."""
        if isinstance(self.weight_spec, LevelSpec):
            return self.layer_layout(decode(self.qweight, self.levels))
        return self.layer_layout(dequantize(self.qweight, self.w_scale, self.w_zero_point, self.weight_spec))

    def weight_bytes(self) -> int:
        """Deployed bytes of the weight: its levels at their packed width, plus the scales
        (float32) and zero points (omitted for symmetric signed grids) or the level table."""
        spec = self.weight_spec
        packed = math.ceil(self.qweight.numel() * spec.bits / 8)
        if isinstance(spec, LevelSpec):  # the table in float32, thresholds too when not the midpoints
            extra = self.boundaries.numel() if isinstance(spec, TernarySpec) else 0
            return packed + 4 * (self.levels.numel() + extra)
        zero_point_bytes = 0 if (spec.symmetric and spec.signed) else math.ceil(spec.bits / 8)
        return packed + self.w_scale.numel() * (4 + zero_point_bytes)


@dataclass(frozen=True, eq=False)
class OpRecord:
    """A quantized addition, average pool or concatenation as it deploys: its operand grids and
    its output grid (integer kinds only), ``pool`` / ``dim`` for the op itself."""

    name: str
    type: str  # "QuantAdd" | "QuantMul" | "QuantPool" | "QuantConcat" | "QuantMatMul" (no output grid: float product)
    kind: Kind
    reason: str
    inputs: tuple = ()
    output: Optional[Grid] = None
    pool: Optional[torch.nn.Module] = None
    is_global: bool = False
    dim: int = 0
    relu: bool = False  # an addition with the ReLU after it taken in


@dataclass(frozen=True)
class FloatRecord:
    """A module ``prepare`` left float (``qmodel.left_float``), and why: it deploys as it is."""

    name: str
    type: str
    reason: str
    kind: Kind = Kind.FLOAT


@dataclass(frozen=True, eq=False)
class Lowering:
    """Every record of one model on one target, in module order."""

    target: object
    layers: dict  # name → LayerRecord
    ops: dict  # name → OpRecord
    floats: dict = field(default_factory=dict)  # name → FloatRecord

    def records(self) -> list:
        return [*self.layers.values(), *self.ops.values(), *self.floats.values()]


def record_summaries(records) -> dict:
    """The records without their tensors, compact, as files list them: each weight grid once in
    ``specs`` and each record as ``{"name", "kind", "weight": spec index, "input": [scale,
    zero_point, bits, signed], "smoothed", "reason"}`` (absent fields are empty)."""
    specs, rows = [], []
    for r in records:
        row = {"name": r.name, "kind": r.kind.value}
        spec = getattr(r, "weight_spec", None)
        if spec is not None:
            d = spec.to_dict()
            if d not in specs:
                specs.append(d)
            row["weight"] = specs.index(d)
        grid = getattr(r, "input", None)
        if isinstance(grid, Grid):
            row["input"] = [grid.scale, grid.zero_point, grid.spec.bits, grid.spec.signed]
        if getattr(r, "smooth_scale", None) is not None:
            row["smoothed"] = True
        if r.reason:
            row["reason"] = r.reason
        rows.append(row)
    return {"specs": specs, "records": rows}

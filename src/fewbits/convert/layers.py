"""Integer layers: int8 (or fewer-bit) weights, int32 biases, fixed-point requantization.

Each is built from its lowered record (:mod:`fewbits.lower`). A layer takes either a float tensor (quantized here with its input grid: the "input quantize")
or an integer tensor already on that grid (the previous layer requantized into it). It returns
either float (``acc · s_x · s_w``, the "output dequantize") or, when the converter gave it the
next layer's grid, integers requantized with per-channel ``(m0, shift)`` multipliers, clamped to
any ReLU / ReLU6 that followed it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..lower.records import Grid, LayerRecord, OpRecord
from ..numerics.affine import dequantize, quantize
from ..numerics.fixed_point import fixed_point_multiplier, requantize, rounding_right_shift
from ..runtime.reference import int_avg_pool_sums, int_conv, int_conv_transpose, int_linear, int_max_pool
from ..spec import PerChannel


class OutputGrid:
    """Where a layer's int32 accumulator goes: the next input grid and the clamp bounds."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def clamp_below(self, real: float) -> None:  # ReLU: nothing under the level of `real`
        self.qmin = max(self.qmin, min(self.qmax, self.level(real)))

    def clamp_above(self, real: float) -> None:  # ReLU6's upper bound
        self.qmax = min(self.qmax, max(self.qmin, self.level(real)))

    def level(self, real: float) -> int:
        return int(round(real / self.scale)) + self.zero_point  # round half to even, as quantize

    def __repr__(self) -> str:
        return f"OutputGrid(scale={self.scale:.4g}, zero_point={self.zero_point}, clamp=[{self.qmin}, {self.qmax}])"


class _IntegerLayer(nn.Module):
    """Shared state, from the layer's lowered record: integer weights, their qparams, the input
    grid, the int32 bias."""

    def __init__(self, record: LayerRecord) -> None:
        super().__init__()
        self.name = record.name
        grid = record.input
        self.in_spec = grid.spec
        self.register_buffer("x_scale", torch.tensor(grid.scale, dtype=torch.float32))
        self.register_buffer("x_zero_point", torch.tensor(grid.zero_point, dtype=torch.int32))
        self.register_buffer("qweight", record.layer_layout(record.qweight).clone())
        w_scale, w_zero_point = record.channel_qparams()
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("w_zero_point", w_zero_point.to(torch.int32))
        self.register_buffer("acc_scale", record.acc_scale.clone())  # float64: s_x·s_w without another rounding
        self.register_buffer("bias_q", record.bias_q)
        self.register_buffer("smooth_scale", record.smooth_scale)  # SmoothQuant's divisor
        self.output: Optional[OutputGrid] = None
        self.register_buffer("m0", None)
        self.register_buffer("shift", None)
        # a layer with its own output grid (record.output) requantizes into it, and hands integers
        # on when the converter found its consumers take that grid (emit_integers), else float
        self.out: Optional[Grid] = record.output
        self.emit_integers = False
        if record.output is not None:
            g = record.output
            self.requantize_into(OutputGrid(g.scale, g.zero_point, g.qmin, g.qmax))

    def requantize_into(self, grid: OutputGrid) -> None:
        """Emit integers on ``grid`` instead of float: per-channel ``M = s_x·s_w / s_y = m0·2^-shift``."""
        pairs = [fixed_point_multiplier(float(a) / grid.scale) for a in (self.x_scale.double() * self.w_scale.double())]
        self.m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        self.shift = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        self.output = grid

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_floating_point(x):
            if self.smooth_scale is not None:
                x = x / self.smooth_scale
            return quantize(x, self.x_scale, self.x_zero_point, self.in_spec).to(torch.int32)
        return x  # already on this layer's grid: the converter arranged it

    def _finish(self, acc: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        if self.output is None:
            return (acc.to(torch.float64) * self.acc_scale.reshape(shape)).to(torch.float32)
        g = self.output
        levels = requantize(acc, self.m0.reshape(shape), self.shift.reshape(shape), g.zero_point, g.qmin, g.qmax,
                            single_rounding=True)
        if self.out is not None and not self.emit_integers:
            return self.out.dequantize(levels)
        return levels

    def extra_repr(self) -> str:
        out = "float" if self.output is None else repr(self.output)
        return f"{self.name}: int{self.in_spec.bits} inputs, weights {tuple(self.qweight.shape)}, output {out}"


class IntegerLinear(_IntegerLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = int_linear(self._input(x), int(self.x_zero_point), self.qweight, self.w_zero_point, self.bias_q)
        return self._finish(acc, acc.dim() - 1)


class IntegerConv(_IntegerLayer):
    def __init__(self, record: LayerRecord) -> None:
        super().__init__(record)
        self.geometry = dict(record.geometry)
        self.conv = int_conv_transpose if record.transposed else int_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.conv(self._input(x), int(self.x_zero_point), self.qweight, self.w_zero_point, self.bias_q,
                        **self.geometry)
        return self._finish(acc, 1)


class IntegerEmbedding(nn.Module):
    """Integer table rows, dequantized on lookup: the output is float (a float island follows)."""

    def __init__(self, record: LayerRecord) -> None:
        super().__init__()
        self.spec = record.weight_spec
        self.register_buffer("qweight", record.qweight.clone())
        self.register_buffer("scale", record.w_scale.float())
        self.register_buffer("zero_point", record.w_zero_point)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[idx]
        g = self.spec.granularity
        if isinstance(g, PerChannel) and g.axis == 0:  # one scale per row
            s, z = self.scale[idx].unsqueeze(-1), self.zero_point[idx].unsqueeze(-1).float()
            return (rows.float() - z) * s
        return dequantize(self.qweight, self.scale, self.zero_point, self.spec)[idx]


class IntegerMaxPool(nn.Module):
    """Max pooling that passes integers through as integers and floats as floats."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if torch.is_floating_point(x) else int_max_pool(x, self.pool)


class _IntegerOp(nn.Module):
    """An op between layers with its own output grid: integers out when the converter found that
    every consumer works on that grid (``emit_integers``), float (dequantized) otherwise."""

    out: Grid

    def _finish(self, levels: torch.Tensor) -> torch.Tensor:
        return levels.to(torch.int32) if self.emit_integers else self.out.dequantize(levels)

    @staticmethod
    def _centered(x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``q − z`` of ``x``: float operands are quantized here, integers arrive on ``grid``."""
        return (grid.quantize(x) if torch.is_floating_point(x) else x).to(torch.int64) - grid.zero_point


class IntegerAdd(_IntegerOp):
    """``Q_out(Q_a(a) + Q_b(b))`` on integers: ``(q_a − z_a)·m_a + (q_b − z_b)·m_b`` exactly in int64,
    with ``m ≈ (s/s_out)·2^k`` sharing one shift ``k``, rounded once (an exact half to the even
    level, as the simulation and ONNX Runtime round), plus ``z_out``, clamped.

    Operands arrive as float (quantized here) or as integers already on their grid; the result
    is dequantized to float unless the converter found that every consumer works on the output
    grid (``emit_integers``)."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.name = record.name
        (self.a, self.b), self.out = record.inputs, record.output
        (ma, sa), (mb, sb) = (fixed_point_multiplier(g.scale / self.out.scale) for g in (self.a, self.b))
        self.shift = max(sa, sb)
        self.m_a, self.m_b = ma << (self.shift - sa), mb << (self.shift - sb)
        # a ReLU taken in: nothing below the level of 0 (the zero point)
        self.floor = max(self.out.spec.qmin, self.out.zero_point) if record.relu else self.out.spec.qmin
        if max(self.m_a, self.m_b) >= 2**40:  # |q − z| ≤ 2^16: the int64 sum stays below 2^57
            raise ValueError(f"addition '{self.name}': operand scales differ by more than 2^9; "
                             "no shared fixed-point shift in 64 bits")
        self.emit_integers = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = self._centered(a, self.a) * self.m_a + self._centered(b, self.b) * self.m_b
        levels = rounding_right_shift(t, self.shift, "even") + self.out.zero_point
        return self._finish(levels.clamp(self.floor, self.out.spec.qmax))

    def extra_repr(self) -> str:
        return f"{self.name}: m_a={self.m_a}, m_b={self.m_b}, shift={self.shift}, output {'integers' if self.emit_integers else 'float'}"


class IntegerMul(_IntegerOp):
    """``Q_out(Q_a(a) · Q_b(b))`` on integers: ``(q_a − z_a)·(q_b − z_b)`` exactly in int64, times the
    fixed-point ``M = s_a·s_b/s_out``, rounded once (an exact half to the even level), plus
    ``z_out``, clamped. Operands arrive as float (quantized here) or as integers on their grid."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.name = record.name
        (self.a, self.b), self.out = record.inputs, record.output
        self.m0, self.shift = fixed_point_multiplier(self.a.scale * self.b.scale / self.out.scale)
        self.emit_integers = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = self._centered(a, self.a) * self._centered(b, self.b) * self.m0  # |levels| ≤ 2^16 each: below 2^63
        levels = rounding_right_shift(t, self.shift, "even") + self.out.zero_point
        return self._finish(levels.clamp(self.out.spec.qmin, self.out.spec.qmax))

    def extra_repr(self) -> str:
        return f"{self.name}: m0={self.m0}, shift={self.shift}, output {'integers' if self.emit_integers else 'float'}"


class IntegerMatMul(nn.Module):
    """``Q_a(a) @ Q_b(b)`` of two activations on integers: ``(q_a − z_a)·(q_b − z_b)`` summed exactly
    (int64 range, computed in float64: |sum| < 2^53 for any length below 2^37), times ``s_a·s_b``;
    the product leaves as float (a softmax or a layer's input quantizer follows)."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.name = record.name
        self.a, self.b = record.inputs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = (self.a.quantize(a).to(torch.float64) - self.a.zero_point)
        qb = (self.b.quantize(b).to(torch.float64) - self.b.zero_point)
        return (torch.matmul(qa, qb) * (self.a.scale * self.b.scale)).to(torch.float32)

    def extra_repr(self) -> str:
        return f"{self.name}: s_a={self.a.scale:.4g}, s_b={self.b.scale:.4g}, float product"


class IntegerAvgPool(_IntegerOp):
    """Average pooling on integers: exact window sums of ``q − z_in`` requantized with
    ``M = s_in / (n · s_out)`` (one fixed-point multiplier per window size ``n``), rounded once,
    an exact half to the even level (frequent: four values averaged on one grid give halves)."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.name, self.pool = record.name, record.pool
        (self.a,), self.out = record.inputs, record.output
        self.emit_integers = False

    def _fixed_point(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m0, shift)`` per output position, one multiplier per distinct window size."""
        sizes, index = counts.unique(return_inverse=True)
        pairs = torch.tensor([fixed_point_multiplier(self.a.scale / (n * self.out.scale)) for n in sizes.tolist()],
                             dtype=torch.int64)
        return pairs[index, 0], pairs[index, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums, counts = int_avg_pool_sums(self._centered(x, self.a), self.pool)
        m0, shift = self._fixed_point(counts)
        o = self.out
        return self._finish(requantize(sums, m0, shift, o.zero_point, o.spec.qmin, o.spec.qmax, single_rounding=True,
                                       ties="even"))

    def extra_repr(self) -> str:
        return f"{self.name}: {type(self.pool).__name__}, output {'integers' if self.emit_integers else 'float'}"


class IntegerConcat(_IntegerOp):
    """Concatenation on integers: each operand's ``q − z_i`` requantized onto the output grid with
    ``M_i = s_i / s_out`` (exactly the identity when the grids are equal)."""

    def __init__(self, record: OpRecord) -> None:
        super().__init__()
        self.name, self.dim = record.name, record.dim
        self.grids = list(record.inputs)
        self.out = record.output
        self.multipliers = [fixed_point_multiplier(g.scale / self.out.scale) for g in self.grids]
        self.emit_integers = False

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        o = self.out
        parts = [requantize(self._centered(x, g), m0, shift, o.zero_point, o.spec.qmin, o.spec.qmax,
                            single_rounding=True, ties="even")
                 for x, g, (m0, shift) in zip(xs, self.grids, self.multipliers)]
        return self._finish(torch.cat(parts, self.dim))

    def extra_repr(self) -> str:
        return f"{self.name}: {len(self.grids)} operands on dim {self.dim}, output {'integers' if self.emit_integers else 'float'}"

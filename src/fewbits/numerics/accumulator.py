"""Where an integer layer's inputs and weights meet: the int32 accumulator and its bias.

An integer GEMM sums ``(q_x − z_x)·(q_w − z_w)`` in int32; the sum is the real product on a grid
of step ``s_x·s_w`` per output channel, so a float bias enters it as ``round(b / (s_x·s_w))``.
The simulated layer (its bias rounding) and the lowering (the deployed int32 bias) both call
:func:`int32_bias`; :func:`accumulator_blocker` says when no such accumulator exists.
"""
from __future__ import annotations

import torch

from ..spec import LevelSpec, PerChannel, PerTensor

INT32_MAX = 2**31 - 1


def accumulator_blocker(x_spec, x_dynamic: bool, w_spec) -> str:
    """Why inputs on ``x_spec`` (``None``: not quantized) and weights on ``w_spec`` cannot meet in
    an int32 accumulator of step ``s_x·s_w`` per output channel (static per-tensor input,
    per-tensor or per-output-channel uniform weights); empty when they can."""
    if w_spec is None:
        return "no weight quantizer"
    for spec, role in ((w_spec, "weight"), (x_spec, "input")):
        if isinstance(spec, LevelSpec):
            return f"{spec.kind} {role} grid: computes in float with the decoded levels"
    if x_spec is None:
        return "weight-only: computes in float with the dequantized weights"
    if x_dynamic:
        return "dynamic input ranges: not converted yet, runs simulated"
    if not isinstance(x_spec.granularity, PerTensor):
        return "per-channel input grid: an integer GEMM needs one input scale"
    g = w_spec.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
        return f"weights quantized {g}: one scale per output channel is needed to requantize an integer accumulator"
    return ""


def accumulator_scale(x_scale: torch.Tensor, w_scale: torch.Tensor, channels: int) -> torch.Tensor:
    """``s_x·s_w`` per output channel in float64 (no second rounding of the product)."""
    return x_scale.detach().double().reshape(()) * w_scale.detach().double().reshape(-1).expand(channels)


def int32_bias(bias: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """The bias in accumulator levels, ``round(b / (s_x·s_w))`` (ties to even), as float64
    integers; :func:`to_int32` stores them."""
    return torch.round(bias.detach().double() / acc_scale)


def to_int32(levels: torch.Tensor, what: str) -> torch.Tensor:
    """``levels`` as int32, or an error naming ``what`` when one does not fit."""
    if levels.numel() and float(levels.abs().max()) > INT32_MAX:
        raise ValueError(f"{what}: the bias does not fit int32 at scale s_x·s_w")
    return levels.to(torch.int32)

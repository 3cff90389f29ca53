"""Affine (uniform) quantization: choose qparams, quantize, dequantize, fake-quantize.

The grid is ``x ≈ scale · (q − zero_point)`` with integer ``q`` in ``[qmin, qmax]``.
Arithmetic follows PyTorch's CPU kernels step for step (float32, ``x · (1/scale)``, round,
add the zero point, clamp) so that :func:`fake_quantize` equals
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import QuantSpec, Rounding
from .layout import expand

_EPS = torch.finfo(torch.float32).eps  # the floor torch.ao observers put under every scale


def choose_qparams(min_val, max_val, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` onto the grid of ``spec``.

    The range is first widened to contain 0, so that zero (padding, ReLU) is exact.

    * asymmetric: ``s = (max − min) / (qmax − qmin)``, ``z = qmin − round(min / s)`` (clamped);
    * symmetric: ``s = max(|min|, |max|) / ((qmax − qmin) / 2)``, ``z = 0`` for signed grids and
      the midpoint ``(qmin + qmax + 1) // 2`` (128 for uint8) for unsigned ones.

    With the full signed range this is ``torch.ao``'s convention (``amax / 127.5`` at 8 bits);
    with ``narrow_range`` it is TensorFlow's (``amax / 127``). Scales are floored at float32
    epsilon, so an all-zero range gives a finite scale.

    >>> s, z = choose_qparams(-1.0, 3.0, QuantSpec(bits=8, signed=False, symmetric=False))
    >>> round(s.item() * 255, 6), z.item()
    (4.0, 64)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val {tuple(min_val.shape)} and max_val {tuple(max_val.shape)} differ in shape")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("choose_qparams got a non-finite min_val or max_val")
    if (min_val > max_val).any():
        raise ValueError("choose_qparams got min_val > max_val")
    zero = torch.zeros_like(min_val)
    min_neg, max_pos = torch.minimum(min_val, zero), torch.maximum(max_val, zero)
    eps = torch.tensor(_EPS, dtype=torch.float32)
    if spec.symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.maximum(amax / (float(spec.qmax - spec.qmin) / 2), eps)
        mid = 0 if spec.signed else (spec.qmin + spec.qmax + 1) // 2
        zero_point = torch.full_like(min_val, mid, dtype=torch.int32)
    else:
        scale = torch.maximum((max_pos - min_neg) / float(spec.qmax - spec.qmin), eps)
        zero_point = spec.qmin - torch.round(min_neg / scale).to(torch.int32)
        zero_point = zero_point.clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def storage_dtype(spec: QuantSpec) -> torch.dtype:
    """Smallest torch integer dtype holding ``[qmin, qmax]``."""
    if spec.bits <= 8:
        return torch.int8 if spec.signed else torch.uint8
    return torch.int16 if spec.signed else torch.int32


def _round(v: torch.Tensor, mode: Rounding, generator: Optional[torch.Generator]) -> torch.Tensor:
    if mode is Rounding.NEAREST:
        return torch.round(v)  # half to even, like std::nearbyint in torch's kernels
    if mode is Rounding.FLOOR:
        return torch.floor(v)
    if mode is Rounding.CEIL:
        return torch.ceil(v)
    noise = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return torch.floor(v + noise)


def _grid(x, scale, zero_point, spec):
    """Broadcast qparams; returns (scale, zero point as float, x as float32)."""
    if not torch.is_floating_point(x):
        raise ValueError(f"quantize expects a floating-point tensor, got {x.dtype}")
    x = x.to(torch.float32)
    shape = tuple(x.shape)
    s = expand(torch.as_tensor(scale, dtype=torch.float32), shape, spec.granularity)
    zp = torch.as_tensor(zero_point)
    if torch.is_floating_point(zp) and not torch.equal(zp, torch.round(zp)):
        raise ValueError("zero_point must hold integers")
    z = expand(zp.to(torch.float32), shape, spec.granularity)
    return x, s, z


def _integer_grid(x, s, z, spec, generator):
    """Unclamped integer level (as float32) of every element: ``round(x · (1/s)) + z``."""
    return _round(x * torch.reciprocal(s), spec.rounding, generator) + z


def quantize(x: torch.Tensor, scale, zero_point, spec: QuantSpec,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` in :func:`storage_dtype`.

    ``scale`` and ``zero_point`` have the qparam shape of ``spec.granularity`` (see
    :mod:`fewbits.numerics.layout`). ``generator`` seeds stochastic rounding.
    """
    x, s, z = _grid(x, scale, zero_point, spec)
    q = _integer_grid(x, s, z, spec, generator).clamp(spec.qmin, spec.qmax)
    return q.to(storage_dtype(spec))


def dequantize(q: torch.Tensor, scale, zero_point, spec: QuantSpec) -> torch.Tensor:
    """``x̂ = (q − zero_point) · scale`` in float32."""
    shape = tuple(q.shape)
    s = expand(torch.as_tensor(scale, dtype=torch.float32), shape, spec.granularity)
    z = expand(torch.as_tensor(zero_point).to(torch.float32), shape, spec.granularity)
    return (q.to(torch.float32) - z) * s


class _FakeQuantize(torch.autograd.Function):
    """Forward: dequantize(quantize(x)). Backward: straight-through inside the clip range."""

    @staticmethod
    def forward(ctx, x, s, z, spec, generator):
        level = _integer_grid(x, s, z, spec, generator)
        inside = (level >= spec.qmin) & (level <= spec.qmax)
        ctx.save_for_backward(inside)
        return (level.clamp(spec.qmin, spec.qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, spec: QuantSpec,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Simulated quantization ``dequantize(quantize(x))``, differentiable with the STE.

    The gradient with respect to ``x`` is the identity where ``x`` lands inside
    ``[qmin, qmax]`` and zero where it is clipped (the mask ``torch.fake_quantize_*`` use).
    Computed in float32, returned in the dtype of ``x``.
    """
    out_dtype = x.dtype
    x, s, z = _grid(x, scale, zero_point, spec)
    y = _FakeQuantize.apply(x, s, z, spec, generator)
    return y if out_dtype == torch.float32 else y.to(out_dtype)

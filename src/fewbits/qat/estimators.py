"""Gradient estimators for rounding: what the backward pass of fake quantization returns.

Rounding has zero derivative almost everywhere, so training through it needs a stand-in
(the straight-through estimator, STE: Bengio et al. 2013). With ``v = x/s + z`` the level before
rounding and ``[qmin, qmax]`` the grid, the forward pass is always the exact fake quantization
``ŷ = s·(clamp(round(v), qmin, qmax) − z)``; the estimators differ in ``∂ŷ/∂x``:

* ``identity`` — 1 everywhere: rounding and clipping both ignored (the plain STE).
* ``clipped`` — 1 where ``qmin ≤ round(v) ≤ qmax``, 0 where the value is clipped (the default,
  and the mask of ``torch.fake_quantize_*``). On an unsigned grid starting at 0 this is the
  clipped-ReLU STE that Yin et al. (ICLR 2019, arXiv:1903.05662) find better than identity.
* ``relu`` — 1 above the grid's lower end, no upper clip: Yin et al.'s ReLU STE.
* ``soft`` — the derivative of a smooth staircase, ``1 + tanh(k·(frac(v) − ½))/ tanh(k/2)``
  summed per step (the tanh soft rounding of DSQ, Gong et al. 2019), inside the range:
  ``k / (2·tanh(k/2)) · sech²(k·(frac(v) − ½))``. Its average over one step is exactly 1 (the
  staircase rises one level per step), it peaks at the rounding thresholds and tends to
  ``clipped`` as ``k → 0``; ``k`` is the ``temperature`` (default 4).
"""
from __future__ import annotations

import math

import torch

from ..numerics.affine import _grid, _integer_grid
from ..spec import QuantSpec

ESTIMATORS = ("identity", "clipped", "relu", "soft")


def check_estimator(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"gradient estimator must be one of {list(ESTIMATORS)}, got {name!r}")
    return name


class _EstimatedFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, z, spec: QuantSpec, estimator: str, temperature: float):
        level = _integer_grid(x, s, z, spec, None)
        ctx.estimator, ctx.temperature = estimator, temperature
        if estimator == "soft":
            v = x * torch.reciprocal(s) + z  # the unrounded level
            ctx.save_for_backward(level, v)
        else:
            ctx.save_for_backward(level)
        ctx.spec = spec
        return (level.clamp(spec.qmin, spec.qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        spec, estimator = ctx.spec, ctx.estimator
        level = ctx.saved_tensors[0]
        if estimator == "identity":
            return grad, None, None, None, None, None
        if estimator == "relu":
            return grad * (level >= spec.qmin), None, None, None, None, None
        inside = (level >= spec.qmin) & (level <= spec.qmax)
        if estimator == "clipped":
            return grad * inside, None, None, None, None, None
        v, k = ctx.saved_tensors[1], ctx.temperature
        frac = v - torch.floor(v)
        slope = (k / (2.0 * math.tanh(k / 2.0))) / torch.cosh(k * (frac - 0.5)) ** 2
        return grad * inside * slope, None, None, None, None, None


def fake_quantize_estimated(x: torch.Tensor, scale, zero_point, spec: QuantSpec, estimator: str = "clipped",
                            temperature: float = 4.0) -> torch.Tensor:
    """:func:`fewbits.numerics.affine.fake_quantize` (same forward, bit for bit) with the
    backward pass of ``estimator``; no gradient reaches ``scale`` or ``zero_point``."""
    check_estimator(estimator)
    if not temperature > 0:
        raise ValueError(f"soft estimator temperature must be > 0, got {temperature}")
    out_dtype = x.dtype
    x, s, z = _grid(x, scale, zero_point, spec)
    y = _EstimatedFakeQuantize.apply(x, s, z, spec, estimator, float(temperature))
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def round_pass(v: torch.Tensor) -> torch.Tensor:
    """``round(v)`` forward, identity backward."""
    return v + (torch.round(v) - v).detach()


def grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """``t`` forward, gradient multiplied by ``g`` backward (LSQ's step-size gradient scale)."""
    return (t - t * g).detach() + t * g

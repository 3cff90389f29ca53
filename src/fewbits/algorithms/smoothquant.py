r"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023).

A linear layer ``Y = X Wᵀ`` is rewritten exactly as ``Y = (X diag(s)⁻¹) (W diag(s))ᵀ``. With

    s_j = max|X_j|^α / max|W_j|^(1−α)                                         (paper, eq. 4)

the input channels j with outliers are divided down and the matching weight columns scaled up,
so a per-tensor activation grid no longer spends its range on a few channels; per-channel weight
scales absorb the growth. α = 0.5 is the paper's default. ``alpha=None`` picks α per layer from a
grid by the error of the quantized layer output on calibration rows, and leaves the layer
unsmoothed when no α beats s = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..numerics.affine import choose_qparams, fake_quantize
from ..observe.methods import weight_qparams
from ..spec import QuantSpec


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``; channels with an all-zero input or weight column get 1."""
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    s = act_absmax.clamp(min=1e-12).pow(alpha) / weight_absmax.clamp(min=1e-12).pow(1 - alpha)
    return torch.where(dead, torch.ones_like(s), s)


@dataclass
class LayerInputs:
    """What one layer saw during calibration: per-channel min and max over every row (these give
    the exact per-tensor min/max of ``X / s`` for any positive ``s``) and a sample of rows."""

    lo: torch.Tensor
    hi: torch.Tensor
    rows: torch.Tensor
    absmean: Optional[torch.Tensor] = None  # mean |x_j| over every row (AWQ's activation salience)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


def quantized_output_sqnr(inputs: LayerInputs, weight: torch.Tensor, s: torch.Tensor, input_spec: QuantSpec,
                          weight_spec: QuantSpec, weight_method: str = "minmax") -> float:
    """SQNR (dB) of ``Q(X / s) · Q(W · diag(s))ᵀ`` against ``X Wᵀ`` on the sample rows, the input
    grid set from the calibration min/max of ``X / s`` (the min-max estimate of its range)."""
    x, w = inputs.rows, weight.float()
    w_s = w * s
    ws, wz = weight_qparams(w_s, weight_spec, weight_method)
    lo = torch.clamp((inputs.lo / s).min(), max=0.0)
    hi = torch.clamp((inputs.hi / s).max(), min=0.0)
    xs, xz = choose_qparams(lo, hi, input_spec)
    ref = x @ w.T
    out = fake_quantize(x / s, xs, xz, input_spec) @ fake_quantize(w_s, ws, wz, weight_spec).T
    noise = (out - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def choose_alpha(inputs: LayerInputs, weight: torch.Tensor, grid, input_spec: QuantSpec, weight_spec: QuantSpec,
                 weight_method: str = "minmax") -> tuple[float | None, float, float]:
    """``(alpha, sqnr_unsmoothed, sqnr_best)``: the grid value with the best quantized-output
    SQNR, or ``None`` when none beats leaving the layer as it is (s = 1)."""
    w_absmax = weight.detach().abs().amax(0).float()
    plain = quantized_output_sqnr(inputs, weight, torch.ones_like(w_absmax), input_spec, weight_spec, weight_method)
    best_alpha, best = None, plain
    for alpha in grid:
        s = smoothing_scale(inputs.absmax, w_absmax, alpha)
        score = quantized_output_sqnr(inputs, weight, s, input_spec, weight_spec, weight_method)
        if score > best:
            best_alpha, best = alpha, score
    return best_alpha, plain, best

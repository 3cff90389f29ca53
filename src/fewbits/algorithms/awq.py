r"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and
Acceleration", MLSys 2024).

A few input channels carry large activations; the weights they multiply matter most for the
output ("salient" weights). Instead of keeping them in higher precision, AWQ scales them up
before weight-only quantization and scales the input down by the same factor, which leaves the
float function unchanged (``W x = (W diag(s)) (diag(s)⁻¹ x)``) and shrinks the relative rounding
error of the salient weights (section 3.2). The scale comes from the mean activation magnitude
per input channel, ``s = s_x^α``, with α searched on a grid in [0, 1] for the smallest output
error of the quantized layer on calibration rows (eq. 5):

    α* = argmin_α ‖Q(W · diag(s_x^α)) (diag(s_x^α)⁻¹ X) − W X‖

α = 0 is plain quantization (s = 1), so the search never does worse than it on the calibration
rows. As in the reference code the scales are normalised by ``√(max s · min s)``. The authors'
code adds a search of weight clipping ranges on top; that is not part of this step.
"""
from __future__ import annotations

import torch

from ..numerics.affine import fake_quantize
from ..observe.methods import weight_qparams
from ..spec import QuantSpec


def awq_scale(act_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_x^α / √(max · min)``; channels that never fire count as the smallest seen."""
    sx = act_absmean.float().clamp(min=1e-4)
    s = sx.pow(alpha)
    return s / torch.sqrt(s.max() * s.min())


def quantized_output_error(rows: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, spec: QuantSpec,
                           method: str = "minmax") -> float:
    """Mean squared error of ``Q(W·diag(s)) (x / s)`` against ``W x`` on the sample rows."""
    w = weight.detach().float()
    w_s = w * s
    scale, zero = weight_qparams(w_s, spec, method)
    out = (rows / s) @ fake_quantize(w_s, scale, zero, spec).T
    return float((out - rows @ w.T).pow(2).mean())


def search_alpha(rows: torch.Tensor, act_absmean: torch.Tensor, weight: torch.Tensor, spec: QuantSpec, grid,
                 method: str = "minmax") -> tuple[float, float, float]:
    """``(alpha, error at α = 0, error at the best α)`` over ``grid``."""
    plain = quantized_output_error(rows, weight, torch.ones_like(act_absmean.float()), spec, method)
    best_alpha, best = 0.0, plain
    for alpha in grid:
        if alpha == 0:
            continue
        err = quantized_output_error(rows, weight, awq_scale(act_absmean, alpha), spec, method)
        if err < best:
            best_alpha, best = alpha, err
    return best_alpha, plain, best

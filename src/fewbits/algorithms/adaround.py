r"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
ICML 2020) and stochastic rounding, the baseline it is compared with.

Rounding each weight to the nearest grid point minimises each weight's own error, not the
layer's output error. AdaRound learns, per weight, whether to round down or up:

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, q_min, q_max) − z)                       (eq. 22)
    h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1  (rectified sigmoid, eq. 23)

minimising, layer by layer on calibration inputs (the preceding layers already quantized),

    ‖W x − W̃ x̃‖²_F + λ Σ (1 − |2h(V) − 1|^β)                              (eq. 21, 24)

where ``x`` is the fp32 model's input to the layer and ``x̃`` the quantized model's (asymmetric
reconstruction, section 5). The regulariser drives every h(V) to 0 or 1; β is annealed from 20 to
2 after a warm-up without it, so rounding decisions may flip early and settle late. At the end
each weight rounds up where h(V) ≥ ½ (V ≥ 0). ``V`` starts where h(V) equals the fractional part
of W/s, i.e. at the unrounded weight.

Stochastic rounding draws up with probability equal to the fractional part: unbiased, but its
variance makes it worse than nearest on average (the seeds' rounding table).
"""
from __future__ import annotations

import math

import torch

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(scaled: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = W/s − ⌊W/s⌋`` (``scaled = W/s``)."""
    rest = scaled - torch.floor(scaled)
    p = (rest - GAMMA) / (ZETA - GAMMA)  # in [1/12, 11/12): the logit is finite
    return torch.log(p / (1 - p))


def soft_levels(floor: torch.Tensor, v: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(floor + rectified_sigmoid(v) + zero_point, qmin, qmax)


def hard_levels(floor: torch.Tensor, v: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(floor + (v >= 0).to(floor.dtype) + zero_point, qmin, qmax)


def regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 − |2h(V) − 1|^β``: zero when every h(V) is 0 or 1."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta(iteration: int, iterations: int, warmup: float, start: float, end: float) -> float | None:
    """The annealing schedule: no regulariser (None) during the warm-up, then β falls linearly
    from ``start`` to ``end``."""
    first = int(warmup * iterations)
    if iteration < first:
        return None
    progress = (iteration - first) / max(iterations - first, 1)
    return end + (start - end) * max(0.0, 1.0 - progress)


def stochastic_levels(scaled: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``⌊W/s + u⌋ + z``, ``u ~ U[0, 1)``: up with probability equal to the fractional part."""
    u = torch.rand(scaled.shape, generator=generator, dtype=scaled.dtype)
    return torch.clamp(torch.floor(scaled + u) + zero_point, qmin, qmax)


def flips(levels: torch.Tensor, scaled: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> float:
    """Share of weights whose level differs from round-to-nearest."""
    nearest = torch.clamp(torch.round(scaled) + zero_point, qmin, qmax)
    return float((levels != nearest).double().mean()) if levels.numel() else math.nan

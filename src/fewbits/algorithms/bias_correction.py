r"""Bias correction (Nagel et al., ICCV 2019, section 4.2), empirical and analytic.

Quantizing weights and inputs shifts the expected output of a layer: with
``ỹ = W̃ x̃`` and ``y = W x``, ``E[ỹ] − E[y]`` per output channel is a systematic error that
every later layer inherits (the paper shows it is what breaks MobileNetV2 under per-tensor
quantization). The correction subtracts it from the bias:

    b ← b − (E[ỹ] − E[y])          (expectations over calibration data, per output channel)

Layers are corrected in execution order, each measured with the earlier ones already corrected,
so a correction also absorbs the shift its inputs bring from upstream.

**Analytic** (data-free): the weight error ``ε = W̃ − W`` shifts the output by ``E[ε x] = ε E[x]``.
When the input comes from a layer with a folded BatchNorm through ReLU / ReLU6 / nothing, its
pre-activation per channel is ``N(β, γ²)`` by the BatchNorm's design, and ``E[x]`` is the mean of
that normal clipped to the activation's range (paper, eq. 18–19):

    E[clip(z, a, b)] = a Φ(α) + b (1 − Φ(β')) + μ (Φ(β') − Φ(α)) + σ (φ(α) − φ(β'))

with ``α = (a − μ)/σ``, ``β' = (b − μ)/σ``. Only the weight error is corrected this way (the
input's own quantization error is not modelled), and padding is ignored, as in the paper.
"""
from __future__ import annotations

import torch


def channel_sum(y: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, int]:
    """Per-channel sum of ``y`` (float64) and how many values each channel summed."""
    y = y.detach().double().movedim(channel_dim, -1)
    flat = y.reshape(-1, y.shape[-1])
    return flat.sum(0), flat.shape[0]


def correction(float_mean: torch.Tensor, quant_mean: torch.Tensor) -> torch.Tensor:
    """The amount to add to the bias: ``E[y] − E[ỹ]``."""
    return float_mean - quant_mean


def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: float = float("-inf"),
                        hi: float = float("inf")) -> torch.Tensor:
    """``E[clamp(z, lo, hi)]`` for ``z ~ N(mu, sigma²)`` per channel (``sigma = 0``: ``clamp(mu)``)."""
    mu, sigma = mu.double(), sigma.double()
    normal = torch.distributions.Normal(0.0, 1.0)
    safe = sigma.clamp(min=1e-12)
    a, b = (lo - mu) / safe, (hi - mu) / safe
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf_a, pdf_b = normal.log_prob(a).exp(), normal.log_prob(b).exp()
    lo_term = lo * cdf_a if lo != float("-inf") else torch.zeros_like(mu)
    hi_term = hi * (1 - cdf_b) if hi != float("inf") else torch.zeros_like(mu)
    mean = lo_term + hi_term + mu * (cdf_b - cdf_a) + sigma * (pdf_a - pdf_b)
    return torch.where(sigma > 0, mean, mu.clamp(lo, hi))


def expected_output_shift(weight_error: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``E[ε x]`` per output channel for an input with per-channel mean ``input_mean``: a
    convolution sums its kernel over the constant mean (grouped: within each group)."""
    e = weight_error.double()
    per_input = e.reshape(e.shape[0], e.shape[1], -1).sum(2) if e.dim() > 2 else e  # [out, in / groups]
    if groups == 1:
        return per_input @ input_mean.double()
    out, cin = per_input.shape
    m = input_mean.double().reshape(groups, cin)  # group g's inputs feed group g's outputs
    return (per_input.reshape(groups, out // groups, cin) * m.unsqueeze(1)).sum(2).reshape(out)

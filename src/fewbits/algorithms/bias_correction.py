r"""Empirical bias correction (Nagel et al., ICCV 2019, section 4.2).

Quantizing weights and inputs shifts the expected output of a layer: with
``ỹ = W̃ x̃`` and ``y = W x``, ``E[ỹ] − E[y]`` per output channel is a systematic error that
every later layer inherits (the paper shows it is what breaks MobileNetV2 under per-tensor
quantization). The correction subtracts it from the bias:

    b ← b − (E[ỹ] − E[y])          (expectations over calibration data, per output channel)

Layers are corrected in execution order, each measured with the earlier ones already corrected,
so a correction also absorbs the shift its inputs bring from upstream.
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

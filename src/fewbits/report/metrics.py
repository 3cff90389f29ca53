"""Error metrics between a reference tensor and its quantized version."""
from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ x² / Σ (x − x̂)²)`` in dB.

    ``inf`` when the two are equal; ``-inf`` when the reference is all zeros but not ``approx``.

    >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.25, 0.75])), 4)  # 10·log10(16)
    12.0412
    """
    if reference.shape != approx.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(reference.shape)} vs {tuple(approx.shape)}")
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)

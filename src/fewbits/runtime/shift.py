"""Shift-and-add products for power-of-two and APoT weights (integer reference).

A power-of-two level ``±α·2^-j`` times an integer activation ``x`` is ``±(x << (E − j))`` in
units of ``α·2^-E``; an APoT level is a sum of such terms. :func:`shift_weights` writes every
level as a signed integer ``w = ±Σ_t 2^(e_t)`` (its set bits are the terms) and one real unit per
row; :func:`shift_add_matmul` then multiplies without a multiplier — each set bit of ``|w|``
is one shift of ``x`` and one addition — and equals ``x @ w`` exactly in int64.
"""
from __future__ import annotations

import torch

from ..numerics.levels import apot_magnitudes, level_indices, pow2_magnitudes
from ..spec import APoTSpec, Pow2Spec


def _magnitudes(spec) -> torch.Tensor:
    if isinstance(spec, Pow2Spec):
        return pow2_magnitudes(spec.bits)
    if isinstance(spec, APoTSpec):
        return apot_magnitudes(spec.bits)
    raise ValueError(f"shift-and-add needs power-of-two or APoT levels, got {spec!r}")


def shift_weights(weight: torch.Tensor, levels: torch.Tensor, boundaries: torch.Tensor,
                  spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_int [G, N] int64, unit [G] float64)`` with ``decoded = unit · w_int`` per row
    (rows as :func:`fewbits.numerics.levels.groups_view`).

    The magnitudes are sums of powers of two normalised by their largest, ``γ``; with ``E`` the
    largest exponent used, ``w_int = round(m · γ · 2^E)`` is an exact integer and the unit is
    ``α / (γ · 2^E)`` (``α``: the row's largest level)."""
    mags = _magnitudes(spec)
    raw = mags * (1.0 / mags[mags > 0].min())  # the smallest term is 2^-E: raw values are integers
    gamma_2e = float(raw.max())  # γ·2^E
    idx = level_indices(weight, boundaries, spec)  # [G, N] into the signed levels
    k = mags.numel() - 1  # index of level 0
    w_int = torch.round((idx - k).sign() * raw[(idx - k).abs()]).long()
    alpha = levels.double().abs().amax(1)
    return w_int, alpha / gamma_2e


def shift_add_matmul(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x [B, K] @ w [O, K]ᵀ`` (int64) by shifts and additions only; also the number of
    shift-adds per output row (the set bits of ``|w|``, i.e. the terms).

    For every bit position ``p``: ``acc += (x << p) @ (sign · bit_p(|w|))`` — the matrix of
    ``{−1, 0, 1}`` is a selection with signs, so each term is an add or subtract of a shifted
    ``x``, never a multiply."""
    if x.dtype != torch.int64 or w.dtype != torch.int64:
        raise ValueError(f"shift_add_matmul takes int64 tensors, got {x.dtype} and {w.dtype}")
    sign, mag = w.sign(), w.abs()
    top = int(mag.max()) if mag.numel() else 0
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.int64)
    for p in range(max(top.bit_length(), 0)):
        select = sign * ((mag >> p) & 1)
        if bool(select.any()):
            acc += _signed_select_sum(x << p, select)
    terms = int(sum(bin(int(v)).count("1") for v in mag.reshape(-1).tolist()))
    return acc, terms


def _signed_select_sum(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``Σ_k select[o, k] · x[b, k]`` for ``select ∈ {−1, 0, 1}``: the sum of the chosen
    ``x`` minus the sum of the negated ones."""
    plus, minus = (select > 0).long(), (select < 0).long()
    return torch.einsum("bk,ok->bo", x, plus) - torch.einsum("bk,ok->bo", x, minus)


def shift_linear(x_int: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor,
                 quantizer) -> torch.Tensor:
    """A linear layer on integer inputs and power-of-two / APoT weights, in real units:
    ``y = s_x · unit_o · Σ_k (x_k − z_x) · w_int[o, k]`` (bias not added)."""
    spec = quantizer.spec
    w_int, unit = shift_weights(weight, quantizer.levels, quantizer.boundaries, spec)
    w_int = w_int.reshape(weight.shape[0], -1)
    unit = unit.expand(w_int.shape[0]) if unit.numel() == 1 else unit
    acc, _ = shift_add_matmul(x_int.long() - x_zero_point, w_int)
    return (acc.double() * x_scale * unit[None, :]).float()

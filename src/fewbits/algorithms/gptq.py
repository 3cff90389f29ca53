r"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023).

Quantizing a layer's weight ``W`` (rows = output channels, columns = inputs) to minimise the
output error ``‖W X − Ŵ X‖²`` on calibration inputs ``X`` is a quadratic problem with Hessian
``H = 2 X Xᵀ``, the same for every row. GPTQ quantizes the columns one at a time and spreads each
column's rounding error over the columns not yet quantized, the Optimal Brain Surgeon update:

    q_j = quant(w_j),   δ = (w_j − q_j) / [H⁻¹]_jj,   W_{:, j+1:} ← W_{:, j+1:} − δ [H⁻¹]_{j, j+1:}

using the rows of the upper Cholesky factor of ``H⁻¹`` (numerically stable, section 4 "Cholesky
reformulation"). Details of the paper kept here:

* dampening: ``H + λ·mean(diag H)·I`` with ``λ = 0.01``; inputs that never fire (``H_jj = 0``)
  get ``H_jj = 1`` and a zero weight column;
* lazy batch updates: columns are processed in blocks of 128 and the rest of the matrix is
  updated once per block (same result, fewer memory passes);
* activation order (optional): columns in order of decreasing ``H_jj``, so the columns that
  matter most are quantized while the most freedom to compensate remains;
* groups: with group-wise scales, each group's scale and zero point are fitted to the
  (already updated) weights when GPTQ reaches the group's first column; with activation order the
  groups keep the scales fitted to the original weights ("static groups"), since a group's columns
  are then not quantized together.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def hessian(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``Σ 2 x xᵀ`` over the rows of ``x`` ([n, columns], float64) and the row count: summed over
    batches and divided by the total count this is the paper's ``H = 2 X Xᵀ / n``."""
    x = x.double()
    return 2 * x.T @ x, x.shape[0]


def gptq(weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *,
         group_size: Optional[int] = None, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         refit: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None):
    """Quantize ``weight`` [rows, columns] column by column with error feedback through ``h``.

    ``scale`` / ``zero_point`` are [rows, groups] (one group of all columns for per-channel
    scales). ``refit(columns) → (scale, zero_point)`` of shape [rows] re-fits a group's qparams
    to its current weights at the group's first column (not with ``act_order``). Returns the
    integer levels [rows, columns] (float64) and the scales and zero points used."""
    rows, cols = weight.shape
    w = weight.detach().double().clone()
    h = h.double().clone()
    scale, zero_point = scale.double().clone(), zero_point.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.zeros_like(w)
    size = group_size or cols
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            g = column // size
            if refit is not None and not act_order and group_size and column % group_size == 0:
                group = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group_size]
                scale[:, g], zero_point[:, g] = (t.double() for t in refit(group))
            s, z = scale[:, g], zero_point[:, g]
            q = torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax)
            levels[:, i1 + i] = q
            delta = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= delta.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = delta
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return levels[:, torch.argsort(perm)], scale, zero_point


def output_error(weight: torch.Tensor, h: torch.Tensor, n: int) -> float:
    """``tr(E H Eᵀ) / 2`` per sample for a weight error ``E`` (= mean ``‖E x‖²`` over the rows
    that made ``h``)."""
    e = weight.double()
    return float(torch.einsum("ij,jk,ik->", e, h.double(), e) / (2 * max(n, 1)))

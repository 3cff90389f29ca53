"""Magnitude pruning (Han et al. 2015, "Learning both weights and connections"): the weights of
smallest magnitude are set to zero and kept there while the network retrains.

:func:`magnitude_masks` chooses the survivors — by one threshold over every layer (``global``:
large layers, which are the most redundant, lose the most) or the same fraction in each layer
(``layer``), or per-layer fractions given by name. :func:`sparsity_schedule` spreads a target
over iterative steps, each removing the same fraction of what is left.
"""
from __future__ import annotations

from typing import Union

import torch

SCOPES = ("global", "layer")


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """``1 − (1 − target)^(i/steps)`` for ``i = 1 … steps``: e.g. 0.9 in 3 steps is
    0.536, 0.785, 0.9 — every step keeps the same share (46%) of the surviving weights."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"pruning target must be in [0, 1), got {target}")
    if steps < 1:
        raise ValueError(f"pruning steps must be >= 1, got {steps}")
    return [1.0 - (1.0 - target) ** (i / steps) for i in range(1, steps + 1)]


def _keep_largest(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of the ``keep`` largest entries of ``values`` (ties broken by position)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(values.reshape(-1), keep, sorted=False).indices] = True
    return mask.reshape(values.shape)


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: Union[float, dict[str, float]],
                    scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks (True = kept) pruning ``sparsity`` of the weights by magnitude.

    ``sparsity``: one fraction (``scope`` says over what) or a fraction per layer name (then
    each layer on its own; names missing from the dict are not pruned). Exactly
    ``round(sparsity · n)`` weights go, ties broken by position, so the count is deterministic.
    """
    if scope not in SCOPES:
        raise ValueError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(sparsity, dict):
        unknown = sorted(set(sparsity) - set(weights))
        if unknown:
            raise ValueError(f"per-layer sparsity names layers the model does not prune: {unknown}")
        fractions = {n: float(sparsity.get(n, 0.0)) for n in weights}
    else:
        fractions = {n: float(sparsity) for n in weights}
    for name, f in fractions.items():
        if not 0.0 <= f < 1.0:
            raise ValueError(f"sparsity for '{name}' must be in [0, 1), got {f}")
    if scope == "layer" or isinstance(sparsity, dict):
        return {n: _keep_largest(w.abs(), w.numel() - round(fractions[n] * w.numel())) for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    keep = _keep_largest(flat, flat.numel() - round(float(sparsity) * flat.numel()))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks

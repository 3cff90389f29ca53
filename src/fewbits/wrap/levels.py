"""A quantizer slot on a non-uniform grid (:class:`~fewbits.spec.LevelSpec`): powers of two,
additive powers of two, k-means codebooks, binary and ternary.

After ``set_from(weight)`` the grid (``levels``, ``boundaries``) is fixed and every value maps to
its level, the gradient passing straight through (BinaryConnect's: only where ``|w| ≤ 1``).
In quantization-aware training (:meth:`LevelQuantizer.start_training`) the grid follows the
weight instead:

* powers of two, APoT, binary, TWN: refitted to the current weight every step (STE);
* k-means: the assignment is fixed and the centroids are parameters — each centroid's gradient
  is the sum of its weights' gradients (Deep Compression's fine-tuning by gradient sharing);
* TTQ: the two scales are parameters (∂L/∂α_p = Σ over the positive weights' gradients) and the
  latent weights get the gradient scaled by ``α_p`` / 1 / ``α_n`` on the three parts (Zhu et al.).

A binary *input* grid is the sign of the activation (±1, clipped STE), as in binarized networks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..numerics.levels import choose_levels, decode, groups_view, level_indices, midpoints, quantize_levels
from ..recipe import TensorRecipe, level_role_error
from ..spec import BinarySpec, CodebookSpec, LevelSpec, TernarySpec
from .quantizer import TensorQuantizer


class LevelQuantizer(TensorQuantizer):
    """Maps a tensor onto its per-tensor or per-output-channel levels (see the module doc)."""

    def __init__(self, recipe: TensorRecipe, name: str, role: str) -> None:
        super().__init__(recipe, name, role)
        why = level_role_error(recipe.spec, role)  # (a TensorRecipe refuses dynamic level grids)
        if why:
            raise ValueError(f"'{name}': {why}")
        self.register_buffer("levels", None)
        self.register_buffer("boundaries", None)
        self.register_buffer("indices", None)  # k-means in training: the fixed assignment
        self.learned_levels: Optional[nn.Parameter] = None  # k-means centroids / TTQ [α_n, α_p]
        self.training_grid = False

    @property
    def needs_range(self) -> bool:  # the sign needs no range; weights fit themselves
        return False

    @property
    def ready(self) -> bool:
        return self.role == "input" or self.levels is not None

    @property
    def learned(self) -> bool:
        return self.learned_levels is not None

    def set_from(self, tensor: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Fit the grid to ``tensor`` (``mask``: k-means over the marked values only)."""
        self.levels, self.boundaries = choose_levels(tensor, self.spec, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.role == "input":  # sign activation, gradient where |x| ≤ 1 (Hubara et al. 2016)
            q = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
            return q + (x - x.detach()) * (x.detach().abs() <= 1)
        if self.training_grid:
            return self._train_forward(x)
        if self.levels is None:
            raise RuntimeError(f"quantizer '{self.name}' has no levels yet: set_from(weight) first")
        return self._straight_through(x, quantize_levels(x.detach(), self.levels, self.boundaries, self.spec))

    def _straight_through(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        passthrough = x - x.detach()
        if isinstance(self.spec, BinarySpec) and not self.spec.scaled:  # BinaryConnect's clipped STE
            passthrough = passthrough * (x.detach().abs() <= 1)
        return q + passthrough

    # ---- training -----------------------------------------------------------------------------
    def start_training(self, weight: torch.Tensor) -> None:
        """Follow ``weight`` in training (see the module docstring); fits the grid to it first."""
        if self.role != "weight":
            return
        self.set_from(weight)
        spec = self.spec
        if isinstance(spec, CodebookSpec):
            self.indices = level_indices(weight, self.boundaries, spec)
            self.learned_levels = nn.Parameter(self.levels.clone())
        elif isinstance(spec, TernarySpec) and spec.learned:
            self.learned_levels = nn.Parameter(self.levels[:, [0, 2]].abs().clone())  # [α_n, α_p]
        self.training_grid = True

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if isinstance(spec, CodebookSpec):
            return decode(self.indices, self.learned_levels.to(x.dtype)).reshape(x.shape)
        if isinstance(spec, TernarySpec) and spec.learned:
            w = groups_view(x, spec)
            delta = spec.factor * w.detach().abs().amax(1, keepdim=True)
            pos, neg = (w.detach() > delta).to(x.dtype), (w.detach() < -delta).to(x.dtype)
            alpha_n, alpha_p = self.learned_levels[:, :1].to(x.dtype), self.learned_levels[:, 1:].to(x.dtype)
            factor = pos * alpha_p.detach() + neg * alpha_n.detach() + (1 - pos - neg)
            latent = w * factor - (w * factor).detach()  # zero in value, TTQ's scaled latent gradient
            return (pos * alpha_p - neg * alpha_n + latent).reshape(x.shape)
        levels, boundaries = choose_levels(x, spec)
        return self._straight_through(x, quantize_levels(x.detach(), levels, boundaries, spec))

    @torch.no_grad()
    def stop_training(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Fix the grid at its trained value. Returns the weight the layer should now hold when
        the training moved shared levels rather than the weight (k-means), else ``None``."""
        if not self.training_grid:
            return None
        spec, decoded = self.spec, None
        if isinstance(spec, CodebookSpec):
            levels, order = self.learned_levels.detach().float().sort(1)
            inverse = order.argsort(1)
            decoded = decode(inverse.gather(1, self.indices), levels).reshape(weight.shape)
            self.levels, self.boundaries = levels, midpoints(levels)
        elif isinstance(spec, TernarySpec) and spec.learned:  # the latent weight keeps its meaning
            a = self.learned_levels.detach().float()
            self.levels = torch.stack([-a[:, 0], torch.zeros_like(a[:, 0]), a[:, 1]], 1)
            delta = spec.factor * groups_view(weight, spec).abs().amax(1)
            self.boundaries = torch.stack([-delta, delta], 1).float()
        else:
            self.set_from(weight)
        self.training_grid, self.learned_levels, self.indices = False, None, None
        return decoded

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.name}: {s.kind} {s.bits}-bit, {type(s.granularity).__name__}"


def make_quantizer(recipe: TensorRecipe, name: str, role: str) -> TensorQuantizer:
    """The quantizer slot for ``recipe``: uniform grids get a :class:`TensorQuantizer`,
    non-uniform ones (:class:`~fewbits.spec.LevelSpec`) a :class:`LevelQuantizer`."""
    if isinstance(recipe.spec, LevelSpec):
        return LevelQuantizer(recipe, name, role)
    return TensorQuantizer(recipe, name, role)

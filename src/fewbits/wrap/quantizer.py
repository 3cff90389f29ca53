"""A tensor's quantizer slot: its grid, its range (static, calibrated, or per batch), its observer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..numerics.affine import choose_qparams, fake_quantize
from ..observe.methods import calibrate_qparams, make_observer, weight_qparams
from ..observe.observers import Observer
from ..recipe import TensorRecipe
from ..spec import PerToken


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor (a layer's weight, input or output) with the STE.

    * weights: ``set_from(weight)`` fixes the qparams from the weight itself;
    * static activations: ``start_observing()`` → forward passes (values pass through
      unchanged) → ``finish_observing()`` computes the qparams;
    * dynamic activations: qparams from each batch's own min/max, every forward.
    """

    def __init__(self, recipe: TensorRecipe, name: str, role: str) -> None:
        super().__init__()
        if role not in ("weight", "input", "output"):
            raise ValueError(f"quantizer role must be weight, input or output, got {role!r}")
        if role == "weight" and isinstance(recipe.spec.granularity, PerToken):
            raise ValueError(f"'{name}': per-token grids quantize activations, not weights")
        self.recipe = recipe
        self.name = name
        self.role = role
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.observer: Optional[Observer] = None
        self.enabled = True  # False: values pass through (see fewbits.wrap.quantization_disabled)

    @property
    def spec(self):
        return self.recipe.spec

    @property
    def needs_range(self) -> bool:
        """An activation grid whose static range calibration observes."""
        return self.role != "weight" and not self.recipe.dynamic

    @property
    def ready(self) -> bool:
        return self.recipe.dynamic or self.scale is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self.recipe.dynamic:
            with torch.no_grad():
                if isinstance(self.spec.granularity, PerToken):
                    lo, hi = torch.aminmax(x.detach().float(), dim=-1, keepdim=True)
                else:
                    lo, hi = torch.aminmax(x.detach().float())
                scale, zero_point = choose_qparams(lo, hi, self.spec)
            return fake_quantize(x, scale, zero_point, self.spec)
        if self.scale is None:
            raise RuntimeError(f"quantizer '{self.name}' has no range yet: run fewbits.calibrate(qmodel, batches) first")
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def set_from(self, tensor: torch.Tensor) -> None:
        """Static qparams from the tensor itself (weights: every value seen exactly)."""
        self.scale, self.zero_point = weight_qparams(tensor.detach(), self.spec, self.recipe.method, self.name)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the grid at ``scale`` / ``zero_point`` (an algorithm's choice, e.g. GPTQ's group scales)."""
        if self.scale is not None and tuple(scale.shape) != tuple(self.scale.shape):
            raise ValueError(f"quantizer '{self.name}': scale of shape {tuple(scale.shape)} for a grid of "
                             f"{tuple(self.scale.shape)}")
        self.scale, self.zero_point = scale, zero_point

    def set_grid(self, spec, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Move onto another grid of the same scheme (a narrower width the target needs)."""
        from dataclasses import replace

        self.recipe = replace(self.recipe, spec=spec)
        self.scale, self.zero_point = scale, zero_point

    def clear_range(self) -> None:
        """Forget a static activation range (what it sees changed): calibrate observes it again."""
        if self.role == "weight":
            raise ValueError(f"quantizer '{self.name}': weights refit with set_from, their range is not cleared")
        self.scale = self.zero_point = None

    def start_observing(self) -> None:
        self.observer = make_observer(self.recipe.method, self.spec.granularity, self.name)

    def observed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams the current observer's statistics give (changes nothing)."""
        if self.observer is None or self.observer.empty:
            raise ValueError(f"'{self.name}' saw no data during calibration: its layer never ran on the batches")
        return calibrate_qparams(self.recipe.method, self.observer.state(), self.spec)

    def stop_observing(self, qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Leave observing mode, keeping the old range unless new ``qparams`` are given."""
        self.observer = None
        if qparams is not None:
            self.scale, self.zero_point = qparams

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dynamic" if self.recipe.dynamic else self.recipe.method
        return f"{self.name}: {s.bits}-bit {'signed' if s.signed else 'unsigned'}, {type(s.granularity).__name__}, {kind}"

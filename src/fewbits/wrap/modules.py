"""Quantized layers: the float layer plus explicit weight / input / output quantizer slots.

``QuantLinear.from_float(linear, layer_recipe, name)`` shares the float layer's parameters and
adds the quantizers the recipe asks for (a slot is ``None`` when that tensor stays float).
Convolution weights are quantized as ``[out_channels, in_channels·kh·kw]`` so that per-group
granularity groups the reduction dimension, as for linear layers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..numerics.accumulator import accumulator_blocker, accumulator_scale, int32_bias
from ..numerics.layout import transposed_from_rows, transposed_rows
from ..recipe import LayerRecipe
from .levels import make_quantizer
from .quantizer import TensorQuantizer


class _QuantSlots:
    """Mixin: the three quantizer slots and the shared conversion from a float layer.

    What the rest of fewbits reads of a quantized layer: :meth:`weight_view` (the weight as the
    quantizer sees it), :meth:`quantize_input`, :meth:`compute` (the float op with a given weight
    and bias), :meth:`accumulator_scale` (the int32 accumulator's step) and :meth:`quantized_bias`.
    """

    weight_quantizer: Optional[TensorQuantizer]
    input_quantizer: Optional[TensorQuantizer]
    output_quantizer: Optional[TensorQuantizer]

    def _attach(self, recipe: LayerRecipe, name: str) -> None:
        for slot in ("weight", "input", "output"):
            tensor_recipe = getattr(recipe, slot)
            quantizer = make_quantizer(tensor_recipe, f"{name}.{slot}", slot) if tensor_recipe else None
            setattr(self, f"{slot}_quantizer", quantizer)
        if self.weight_quantizer is not None:
            self.weight_quantizer.set_from(self.weight_view())

    def weight_view(self) -> torch.Tensor:
        """The weight as its quantizer sees it (convolutions: ``[out_channels, in·kh·kw]``)."""
        return self.weight

    def weight_from_view(self, view: torch.Tensor) -> torch.Tensor:
        """A tensor laid out as :meth:`weight_view` back in the weight's own layout."""
        return view.reshape(self.weight.shape)

    def refit_weight(self) -> None:
        """Fit the weight quantizer to the current weight again (after an algorithm changed it)."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.set_from(self.weight_view())

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_from_view(self.weight_quantizer(self.weight_view()))

    def accumulator_scale(self):
        """``s_x·s_w`` per output channel (float64) when the input and the weights meet in an int32
        accumulator with a calibrated input range, else ``None``."""
        xq, wq = self.input_quantizer, self.weight_quantizer
        if wq is None or xq is None or accumulator_blocker(xq.spec, xq.recipe.dynamic, wq.spec) or xq.scale is None:
            return None
        return accumulator_scale(xq.scale, wq.scale, getattr(self, "out_channels", self.weight.shape[0]))

    def quantized_bias(self, bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The bias as the integer model adds it: ``round(b / (s_x·s_w))`` in the int32
        accumulator, i.e. on the grid of step ``s_x·s_w`` per output channel, once the input
        range is calibrated (not while observing or disabled); otherwise the float bias. The
        rounding passes gradients straight through. ``bias``: another bias for this layer's
        accumulator (a BatchNorm folded during training), instead of its own."""
        b, xq, wq = self.bias if bias is None else bias, self.input_quantizer, self.weight_quantizer
        if b is None:
            return b
        step = self.accumulator_scale()
        if step is None or not (xq.enabled and wq.enabled) or xq.observer is not None:
            return b
        b_hat = (int32_bias(b, step) * step).to(b.dtype)
        return b + (b_hat - b).detach()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the product sees it: divided by a SmoothQuant divisor, then quantized."""
        if getattr(self, "smooth_scale", None) is not None:
            x = x / self.smooth_scale
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    @classmethod
    def from_float(cls, module: nn.Module, recipe: LayerRecipe, name: str):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")})
        new._parameters = dict(module._parameters)  # shared: the copy made by prepare owns them
        new._buffers = dict(module._buffers)
        new._modules = {}
        new._attach(recipe, name)
        return new


class QuantLinear(_QuantSlots, nn.Linear):
    """A linear layer with quantizer slots and an optional per-input-feature ``smooth_scale`` s:
    ``y = Q(x / s) · Q(W · diag(s))ᵀ + b``, equal to ``x · Wᵀ + b`` before quantization."""

    def _attach(self, recipe: LayerRecipe, name: str) -> None:
        self.register_buffer("smooth_scale", None)
        super()._attach(recipe, name)

    @torch.no_grad()
    def smooth(self, scale: torch.Tensor) -> None:
        """Move a positive factor per input feature from the input to the weight (SmoothQuant).

        The weight becomes ``W · diag(scale)`` and its qparams are recomputed; inputs are divided
        by ``scale`` before their quantizer, whose range must be calibrated afterwards.
        """
        if scale.shape != (self.in_features,) or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"smooth scale for a linear layer with {self.in_features} inputs must be "
                             f"{self.in_features} finite positive values, got shape {tuple(scale.shape)}")
        scale = scale.to(self.weight.dtype)
        self.weight.mul_(scale)
        self.smooth_scale = scale if self.smooth_scale is None else self.smooth_scale * scale
        self.refit_weight()

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(self.compute(self.quantize_input(x), self.quantized_weight(), self.quantized_bias()))


class _QuantConv(_QuantSlots):
    def weight_view(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(self.compute(self.quantize_input(x), self.quantized_weight(), self.quantized_bias()))


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


class _QuantConvTranspose(_QuantSlots):
    """A transposed convolution: its weight is ``[in, out/groups, *kernel]``; the quantizer sees
    it as ``[out_channels, in/groups·k…]`` (one row per output channel, as for a convolution)."""

    def weight_view(self) -> torch.Tensor:
        return transposed_rows(self.weight, self.groups)

    def weight_from_view(self, view: torch.Tensor) -> torch.Tensor:
        return transposed_from_rows(view, tuple(self.weight.shape), self.groups)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, bias, output_padding=None) -> torch.Tensor:
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(self.kernel_size)]
        padding = self.output_padding if output_padding is None else output_padding
        return conv(x, weight, bias, self.stride, self.padding, padding, self.groups, self.dilation)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        padding = None if output_size is None else self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, len(self.kernel_size), self.dilation)
        return self.quantize_output(self.compute(self.quantize_input(x), self.quantized_weight(),
                                                 self.quantized_bias(), padding))


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    pass


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    pass


class QuantEmbedding(_QuantSlots, nn.Embedding):
    """Weights only: the input is integer indices."""

    def compute(self, idx: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
        return F.embedding(idx, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(self.compute(idx, self.quantized_weight()))


# Dispatch by exact type: a subclass of nn.Linear may use its weight in ways the swap cannot see.
QUANT_MODULES = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
                 nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
                 nn.Embedding: QuantEmbedding}


def recipe_type(layer: nn.Module) -> str:
    """The recipe's type name of a quantized layer (``QuantConv2d`` → ``"Conv2d"``)."""
    return next((base.__name__ for base, quant in QUANT_MODULES.items() if isinstance(layer, quant)),
                type(layer).__name__)

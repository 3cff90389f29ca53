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

from ..recipe import LayerRecipe
from ..spec import LevelSpec, PerChannel, PerTensor
from .quantizer import TensorQuantizer, make_quantizer


def int32_accumulator_blocker(input_quantizer, weight_quantizer) -> str:
    """Why a layer's inputs and weights cannot meet in an int32 accumulator of step ``s_x·s_w``
    per output channel (static per-tensor input, per-tensor or per-output-channel weights);
    empty when they can. The simulated bias rounding and ``fewbits.convert`` share this rule."""
    xq, wq = input_quantizer, weight_quantizer
    if wq is None:
        return "no weight quantizer"
    for q in (wq, xq):
        if q is not None and isinstance(q.spec, LevelSpec):
            return f"{q.spec.kind} {q.role} grid: computes in float with the decoded levels"
    if xq is None:
        return "weight-only: computes in float with the dequantized weights"
    if xq.recipe.dynamic:
        return "dynamic input ranges: not converted yet, runs simulated"
    if not isinstance(xq.spec.granularity, PerTensor):
        return "per-channel input grid: an integer GEMM needs one input scale"
    g = wq.spec.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
        return f"weights quantized {g}: one scale per output channel is needed to requantize an integer accumulator"
    return ""


class _QuantSlots:
    """Mixin: the three quantizer slots and the shared conversion from a float layer."""

    weight_quantizer: Optional[TensorQuantizer]
    input_quantizer: Optional[TensorQuantizer]
    output_quantizer: Optional[TensorQuantizer]

    def _attach(self, recipe: LayerRecipe, name: str) -> None:
        for slot in ("weight", "input", "output"):
            tensor_recipe = getattr(recipe, slot)
            quantizer = make_quantizer(tensor_recipe, f"{name}.{slot}", slot) if tensor_recipe else None
            setattr(self, f"{slot}_quantizer", quantizer)
        if self.weight_quantizer is not None:
            self.weight_quantizer.set_from(self._weight_view())

    def _weight_view(self) -> torch.Tensor:
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self._weight_view()).reshape(self.weight.shape)

    def quantized_bias(self, bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The bias as the integer model adds it: ``round(b / (s_x·s_w))`` in the int32
        accumulator, i.e. on the grid of step ``s_x·s_w`` per output channel, once the input
        range is calibrated (not while observing or disabled); otherwise the float bias. The
        rounding passes gradients straight through. ``bias``: another bias for this layer's
        accumulator (a BatchNorm folded during training), instead of its own."""
        b, xq, wq = self.bias if bias is None else bias, self.input_quantizer, self.weight_quantizer
        if b is None or int32_accumulator_blocker(xq, wq) or xq.scale is None:
            return b
        if not (xq.enabled and wq.enabled) or xq.observer is not None:
            return b
        step = xq.scale.detach().double().reshape(()) * wq.scale.detach().double().reshape(-1)
        b_hat = (torch.round(b.detach().double() / step) * step).to(b.dtype)
        return b + (b_hat - b).detach()

    def _in(self, x):
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _out(self, y):
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
        if self.weight_quantizer is not None:
            self.weight_quantizer.set_from(self._weight_view())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        return self._out(F.linear(self._in(x), self.quantized_weight(), self.quantized_bias()))


class _QuantConv(_QuantSlots):
    def _weight_view(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self._conv_forward(self._in(x), self.quantized_weight(), self.quantized_bias()))


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantEmbedding(_QuantSlots, nn.Embedding):
    """Weights only: the input is integer indices."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return self._out(F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type,
                                     self.scale_grad_by_freq, self.sparse))


# Dispatch by exact type: a subclass of nn.Linear may use its weight in ways the swap cannot see.
QUANT_MODULES = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Embedding: QuantEmbedding}

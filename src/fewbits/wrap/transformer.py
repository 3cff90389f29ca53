"""PyTorch's transformer layers with their fused fast path turned off, so the quantized layers
inside them run.

In eval mode ``nn.TransformerEncoderLayer`` computes the whole layer in one fused kernel
(``torch._transformer_encoder_layer_fwd``) from ``linear1.weight`` / ``linear2.weight`` directly,
and ``nn.TransformerEncoder`` packs padded batches into nested tensors first: swapped layers
inside would never run (calibration then names them as layers that saw no data).
:func:`unfuse_transformers` replaces each encoder layer by :class:`UnfusedTransformerEncoderLayer`
— the same modules and parameters, whose forward is the layer's reference path (self-attention
block, feed-forward block, the two norms) — and turns nested tensors off in the encoders.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def canonical_masks(src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor], dtype) -> tuple:
    """The masks as ``nn.TransformerEncoderLayer`` takes them (boolean or float, made float);
    one call in a torch.fx graph (``torch.fx.wrap``), so the layer's forward traces and its
    residual additions can be quantized."""
    padding = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=dtype)
    mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                             target_type=dtype, check_other=False)
    return mask, padding


torch.fx.wrap("canonical_masks")


class UnfusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always runs its submodules (never the fused kernel)."""

    @classmethod
    def from_float(cls, layer: nn.TransformerEncoderLayer) -> "UnfusedTransformerEncoderLayer":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")})
        new._modules, new._parameters, new._buffers = dict(layer._modules), dict(layer._parameters), dict(layer._buffers)
        return new

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        masks = canonical_masks(src_mask, src_key_padding_mask, src.dtype)
        src_mask, src_key_padding_mask = masks[0], masks[1]
        x = src
        if self.norm_first:  # pre-norm (Xiong et al., 2020)
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


def unfuse_transformers(model: nn.Module) -> list[str]:
    """In place: every ``nn.TransformerEncoderLayer`` of ``model`` (exactly that type) becomes an
    :class:`UnfusedTransformerEncoderLayer`, every ``nn.TransformerEncoder`` stops packing nested
    tensors. Returns the names of the layers replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = module.enable_nested_tensor = False
        if type(module) is nn.TransformerEncoderLayer and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, UnfusedTransformerEncoderLayer.from_float(module))
            replaced.append(name)
    return replaced

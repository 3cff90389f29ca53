"""``nn.MultiheadAttention`` as four linear layers and the attention between them.

``nn.MultiheadAttention`` multiplies by its packed ``in_proj_weight`` and its ``out_proj`` inside
``F.multi_head_attention_forward``: no module swap can reach those products.
:class:`LinearMultiheadAttention` computes the same function with ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` as ordinary ``nn.Linear`` children (which ``prepare`` then quantizes
like any other) and the attention itself in float::

    Q = q_proj(query), K = k_proj(key), V = v_proj(value)            (split into heads)
    A = softmax(Q·Kᵀ / √d_head + attn_mask + key_padding_mask) · V    (heads concatenated)
    out = out_proj(A)

It takes ``nn.MultiheadAttention``'s arguments and returns ``(output, weights or None)`` alike.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def unsupported(mha: nn.MultiheadAttention) -> str:
    """Why ``mha`` cannot be rewritten (its extra learned key/value rows), or empty."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "MultiheadAttention with add_bias_kv: kept float"
    if mha.add_zero_attn:
        return "MultiheadAttention with add_zero_attn: kept float"
    return ""


class LinearMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as ``nn.Linear`` children (see the module doc)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        why = unsupported(mha)
        if why:
            raise ValueError(why)
        e, heads = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        bias = mha.in_proj_bias
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                w = mha.in_proj_weight
                weights, dims = (w[:e], w[e:2 * e], w[2 * e:]), (e, e, e)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
                dims = (e, mha.kdim, mha.vdim)
            for i, (key, weight, dim) in enumerate(zip(("q_proj", "k_proj", "v_proj"), weights, dims)):
                linear = nn.Linear(dim, e, bias=bias is not None, device=weight.device, dtype=weight.dtype)
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias[i * e:(i + 1) * e])
                setattr(self, key, linear)
            out = mha.out_proj
            self.out_proj = nn.Linear(e, e, bias=out.bias is not None, device=out.weight.device, dtype=out.weight.dtype)
            self.out_proj.weight.copy_(out.weight)
            if out.bias is not None:
                self.out_proj.bias.copy_(out.bias)
        self.scores_matmul: Optional[nn.Module] = None  # quantized products (prepare, recipe ``matmuls``)
        self.values_matmul: Optional[nn.Module] = None
        self.train(mha.training)

    def _heads(self, x: Tensor) -> Tensor:  # [N, L, E] → [N, H, L, d]
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # [L, N, E] → [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = (torch.matmul if self.scores_matmul is None else self.scores_matmul)(q, k.transpose(-2, -1))
        scores = scores / math.sqrt(self.head_dim)
        if attn_mask is None and is_causal:
            attn_mask = torch.full((length, source), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
        if attn_mask is not None:  # [L, S] or [N·H, L, S]
            scores = scores + (attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, self.num_heads, length, source))
        if key_padding_mask is not None:  # [N, S]
            scores = scores + key_padding_mask.reshape(n, 1, 1, source)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (torch.matmul if self.values_matmul is None else self.values_matmul)(weights, v)
        out = out.transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

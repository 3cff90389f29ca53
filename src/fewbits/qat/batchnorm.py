"""BatchNorm that keeps training under quantization, folded the way it deploys.

The deployed layer is the convolution with BatchNorm folded in, ``W' = W·γ/σ`` and
``b' = (b − μ)·γ/σ + β`` (running ``μ``, ``σ``), so the grid must be fitted to ``W'``, not ``W``.
While BatchNorm still learns (Jacob et al. 2018, section 3.2; torch.ao's ConvBn), a
:class:`QATConvBn` quantizes the folded weight with the *running* σ, runs the convolution,
divides the factor ``γ/σ`` back out and normalises with the *batch* statistics, which also
update the running ones::

    y = BN_batch(conv(Q(x), Q(W·γ/σ_run)) · σ_run/γ + b)

Once frozen (``freeze_batchnorm``, or ``fit(..., freeze_bn_after=…)``) it computes exactly the
folded layer on the running statistics, with the bias on the accumulator's grid as deployed::

    y = conv(Q(x), Q(W·γ/σ_run)) + b'

``finish`` folds for good: the layer becomes an ordinary quantized layer holding ``W'``, ``b'``.
Data-parallel: the batch mean and mean square are all-reduced (with their gradients), so every
rank normalises with the statistics of the global batch, as SyncBatchNorm does.
"""
from __future__ import annotations

import torch
from torch import nn

from ..wrap.fold import batchnorm_pairs, fold_into, folded_factor_and_bias
from .quantizers import is_distributed


def _reduce_mean(t: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Sum over ranks (differentiable) and the global count."""
    if not is_distributed():
        return t / count, count
    import torch.distributed.nn.functional as dist_fn

    total = torch.tensor(float(count))
    torch.distributed.all_reduce(total)
    return dist_fn.all_reduce(t) / total, int(total.item())


class QATConvBn(nn.Module):
    """A quantized conv / linear ``layer`` (unfolded weight) and the BatchNorm after it."""

    def __init__(self, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("QAT with BatchNorm needs its running statistics (track_running_stats=True)")
        self.layer, self.bn = layer, bn
        self.frozen = False

    def folded_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W·γ/σ_run``, the factor ``γ/σ_run`` and the folded bias, on the running statistics."""
        layer = self.layer
        factor, bias = folded_factor_and_bias(layer.bias, self.bn)
        return layer.weight * factor.reshape([-1] + [1] * (layer.weight.dim() - 1)), factor, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        folded, factor, bias = self.folded_weight()
        wq = layer.weight_quantizer
        w = folded if wq is None else wq(folded.reshape(folded.shape[0], -1)).reshape(folded.shape)
        y = layer.compute(layer.quantize_input(x), w, None)
        channel = [1, -1] + [1] * (y.dim() - 2)
        if self.training and not self.frozen:
            y = y / factor.reshape(channel)
            if layer.bias is not None:
                y = y + layer.bias.reshape(channel)
            y = self._batch_norm(y, channel)
        else:  # the folded bias on the accumulator grid, as deployed
            y = y + layer.quantized_bias(bias).reshape(channel)
        return layer.quantize_output(y)

    def _batch_norm(self, y: torch.Tensor, channel: list) -> torch.Tensor:
        bn = self.bn
        dims = [0] + list(range(2, y.dim()))
        count = y.numel() // y.shape[1]
        mean, n = _reduce_mean(y.sum(dims), count)
        mean_sq, _ = _reduce_mean((y * y).sum(dims), count)
        var = (mean_sq - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked += 1
        out = (y - mean.reshape(channel)) * torch.rsqrt(var + bn.eps).reshape(channel)
        if bn.affine:
            out = out * bn.weight.reshape(channel) + bn.bias.reshape(channel)
        return out

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The layer with this BatchNorm folded in (the grids refit by the caller)."""
        fold_into(self.layer, self.bn)
        return self.layer


def attach_batchnorm(model: nn.Module, quant_types: tuple) -> list[str]:
    """Pair each quantized layer with the BatchNorm right after it in an ``nn.Sequential``
    (the pairs ``fold_batchnorm`` folds); returns the BatchNorms' names."""
    paired = []
    for parent, parent_name, key, layer, bn_key, bn in batchnorm_pairs(model):
        if isinstance(layer, quant_types):
            setattr(parent, key, QATConvBn(layer, bn))
            setattr(parent, bn_key, nn.Identity())
            paired.append(f"{parent_name}.{bn_key}" if parent_name else bn_key)
    return paired


def freeze_batchnorm(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) the batch statistics: every :class:`QATConvBn` uses its running ones."""
    for m in model.modules():
        if isinstance(m, QATConvBn):
            m.frozen = frozen

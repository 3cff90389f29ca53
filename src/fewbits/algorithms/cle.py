r"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019, sections 4.1 and 4.1.1).

**Equalization.** Two layers ``y = f(W⁽²⁾ f(W⁽¹⁾x + b⁽¹⁾) + b⁽²⁾)`` joined by a positively
homogeneous ``f`` (ReLU, identity: ``f(sx) = s f(x)`` for ``s > 0``) compute the same function
after ``W⁽¹⁾ ← S⁻¹W⁽¹⁾``, ``b⁽¹⁾ ← S⁻¹b⁽¹⁾``, ``W⁽²⁾ ← W⁽²⁾S`` with ``S = diag(s)``, ``s > 0``
(paper, eq. 3–5). With ``r⁽¹⁾ᵢ`` the range of output channel i of the first layer and ``r⁽²⁾ᵢ``
the range of input channel i of the second, the choice maximising the product of the per-channel
precisions of both layers is (eq. 8)

    s_i = (1 / r⁽²⁾ᵢ) · √(r⁽¹⁾ᵢ r⁽²⁾ᵢ) = √(r⁽¹⁾ᵢ / r⁽²⁾ᵢ)

after which both ranges equal ``√(r⁽¹⁾ᵢ r⁽²⁾ᵢ)``. Chains of layers (MobileNetV2's
expand → depthwise → project) are equalized pair by pair, repeatedly, until the scales settle.
ReLU6 is not positively homogeneous (its clip at 6 would move to 6/s_i); the paper replaces it
by ReLU, which the driver does for the activations it equalizes through.

**High-bias absorption.** Equalization can leave large biases, which widen the activation range.
Where ``f`` is ReLU and every pre-activation of channel i is at least ``c_i ≥ 0``,
``f(x − c) = f(x) − c`` there, so ``c`` moves into the next layer exactly:
``b⁽¹⁾ ← b⁽¹⁾ − c``, ``b⁽²⁾ ← b⁽²⁾ + W⁽²⁾c`` (eq. 12–14). The paper takes ``c = max(0, β − 3γ)``
from the BatchNorm statistics (mean − 3 std of the pre-activation under a Gaussian); the driver
measures mean − 3 std on calibration data, the same quantity after BatchNorm folding. Values
below ``c`` (rare by construction) are where the function changes. A following convolution that
pads with zeros would see ``c`` at the border only from inside the image, a per-position change
no bias can hold: the driver absorbs only into linear layers and unpadded convolutions.
"""
from __future__ import annotations

import torch


def output_ranges(weight: torch.Tensor) -> torch.Tensor:
    """``max |W|`` per output channel (dimension 0)."""
    return weight.detach().abs().reshape(weight.shape[0], -1).amax(1)


def input_ranges(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """``max |W|`` per input channel: dimension 1, or for a depthwise convolution (one filter per
    channel) dimension 0."""
    w = weight.detach().abs()
    if depthwise:
        return w.reshape(w.shape[0], -1).amax(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(1)


def equalization_scale(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s = √(r⁽¹⁾ / r⁽²⁾)``; a channel that is all zero on either side keeps ``s = 1``."""
    dead = (r1 <= 0) | (r2 <= 0)
    s = torch.sqrt(r1.double().clamp(min=1e-300) / r2.double().clamp(min=1e-300))
    return torch.where(dead, torch.ones_like(s), s)


def _channel_view(s: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return s.to(like.dtype).reshape(shape)


def scale_output_channels(weight: torch.Tensor, bias, s: torch.Tensor) -> None:
    """``W ← S⁻¹W``, ``b ← S⁻¹b`` in place (the first layer of a pair)."""
    weight.div_(_channel_view(s, weight, 0))
    if bias is not None:
        bias.div_(s.to(bias.dtype))


def scale_input_channels(weight: torch.Tensor, s: torch.Tensor, depthwise: bool) -> None:
    """``W ← WS`` in place (the second layer); a depthwise filter i is input channel i."""
    weight.mul_(_channel_view(s, weight, 0 if depthwise else 1))


def absorbed_bias(weight: torch.Tensor, c: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """``W⁽²⁾c`` per output channel: what the second layer's bias gains when its input channels
    lose ``c`` (a convolution sums its kernel over the constant ``c``)."""
    w = weight.detach().double()
    if depthwise:
        return w.reshape(w.shape[0], -1).sum(1) * c.double()
    per_input = w.reshape(w.shape[0], w.shape[1], -1).sum(2) if w.dim() > 2 else w
    return per_input @ c.double()


def absorption_amount(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``c = max(0, mean − 3 std)`` per channel (the paper's ``max(0, β − 3γ)``)."""
    return (mean - 3 * std).clamp(min=0)

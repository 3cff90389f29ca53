"""Where the quantization parameters of a granularity live relative to the tensor.

Every granularity is viewed the same way: the tensor reshaped into ``rows`` (one row per
scale) so that statistics and searches run once, vectorised over rows; results come back in
the *qparam shape* and are expanded to broadcast against the tensor.

===============  =========================  ===================================
granularity      qparam shape (x: [O, I])   rows
===============  =========================  ===================================
PerTensor()      ()                         [1, O*I]
PerChannel(0)    (O,)                       [O, I]
PerGroup(g, -1)  (O, ⌈I / g⌉)               [O * ⌈I / g⌉, g]
PerToken()       (O, 1)                     [O, I]
===============  =========================  ===================================

A group size that does not divide its dimension leaves a partial last group (as ONNX's blocked
``DequantizeLinear`` and ONNX Runtime's 4-bit kernels do: the scale tensor has ``⌈I / g⌉``
entries along the axis). As a row it is filled up to ``g`` elements by repeating its own
elements cyclically, so its minimum and maximum are its own and a search over the row sees its
values in nearly their own proportions (exactly when the partial length divides ``g``).
"""
from __future__ import annotations

import math

import torch

from ..spec import Granularity, PerChannel, PerGroup, PerTensor, PerToken


def resolve_axis(axis: int, ndim: int, field: str) -> int:
    """``axis`` as a non-negative index, or a ValueError naming ``field``."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{field}={axis} is out of range for a tensor with {ndim} dims (allowed: {-ndim}..{ndim - 1})")
    return axis % ndim


def check_granularity(shape: tuple[int, ...], g: Granularity) -> None:
    """Raise ValueError if ``g`` cannot apply to a tensor of ``shape``."""
    if isinstance(g, PerChannel):
        resolve_axis(g.axis, len(shape), "PerChannel.axis")
    elif isinstance(g, PerGroup):
        axis = resolve_axis(g.axis, len(shape), "PerGroup.axis")
        if shape[axis] == 0:
            raise ValueError(f"PerGroup along dim {axis} of size 0 (tensor shape {tuple(shape)}): no group to fit")


def groups_along(n: int, size: int) -> int:
    """How many groups of ``size`` cover ``n`` elements (the last one partial when ``size``
    does not divide ``n``)."""
    return -(-n // size)


def qparam_shape(shape: tuple[int, ...], g: Granularity) -> tuple[int, ...]:
    """Shape of the scale / zero-point tensors for a tensor of ``shape``."""
    check_granularity(shape, g)
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerToken):
        return (*shape[:-1], 1)
    if isinstance(g, PerChannel):
        return (shape[g.axis % len(shape)],)
    axis = g.axis % len(shape)
    return tuple(groups_along(n, g.size) if d == axis else n for d, n in enumerate(shape))


def to_rows(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """View ``x`` as ``[rows, elements]``, one row per quantization parameter."""
    check_granularity(tuple(x.shape), g)
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    if isinstance(g, PerToken):
        return x.reshape(-1, x.shape[-1])
    if isinstance(g, PerChannel):
        return x.movedim(g.axis, 0).reshape(x.shape[g.axis], -1)
    moved = x.movedim(g.axis, -1)
    n = moved.shape[-1]
    rest = n % g.size
    if rest:  # the partial last group filled up by repeating its own elements
        fill = (n - rest) + torch.arange(g.size - rest, device=x.device) % rest
        moved = moved[..., torch.cat([torch.arange(n, device=x.device), fill])]
    return moved.reshape(-1, g.size)


def from_rows(values: torch.Tensor, shape: tuple[int, ...], g: Granularity) -> torch.Tensor:
    """Per-row values ``[rows]`` back in the qparam shape for a tensor of ``shape``."""
    qshape = qparam_shape(shape, g)
    if not isinstance(g, PerGroup):
        return values.reshape(qshape)
    axis = g.axis % len(shape)
    others = [n for d, n in enumerate(shape) if d != axis]
    return values.reshape(*others, groups_along(shape[axis], g.size)).movedim(-1, axis)


def expand(p: torch.Tensor, shape: tuple[int, ...], g: Granularity) -> torch.Tensor:
    """Broadcast a qparam tensor against a tensor of ``shape``."""
    qshape = qparam_shape(shape, g)
    p = torch.as_tensor(p)
    if tuple(p.shape) != qshape and not (isinstance(g, PerTensor) and p.numel() == 1):
        raise ValueError(
            f"quantization parameter of shape {tuple(p.shape)} does not match {g} for a tensor of "
            f"shape {tuple(shape)} (expected {qshape})"
        )
    if isinstance(g, PerTensor):
        return p.reshape(())
    if isinstance(g, PerToken):
        return p
    axis = g.axis % len(shape)
    if isinstance(g, PerChannel):
        return p.reshape([n if d == axis else 1 for d, n in enumerate(shape)])
    return p.repeat_interleave(g.size, dim=axis).narrow(axis, 0, shape[axis])


def transposed_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed convolution's weight ``[in, out/groups, *k]`` as one row per output channel,
    ``[out, in/groups·k…]`` (the layout a convolution's weight has after reshape)."""
    cin, cout_g = w.shape[0], w.shape[1]
    return w.reshape(groups, cin // groups, cout_g, -1).permute(0, 2, 1, 3).reshape(groups * cout_g, -1)


def transposed_from_rows(rows: torch.Tensor, shape: tuple, groups: int) -> torch.Tensor:
    """:func:`transposed_rows` inverted: rows back in the weight's ``shape``."""
    cin, cout_g = shape[0], shape[1]
    return rows.reshape(groups, cout_g, cin // groups, -1).permute(0, 2, 1, 3).reshape(shape)


def num_rows(shape: tuple[int, ...], g: Granularity) -> int:
    return math.prod(qparam_shape(shape, g))

"""Integer GEMM and convolution with int32 accumulation, computed exactly.

The products ``(q_x − z_x)·(q_w − z_w)`` and their sums are integers; they are evaluated in
float64, which represents every integer below 2^53 exactly, so the result equals an int32
accumulation whenever that does not overflow (checked). PyTorch has no CPU integer convolution,
and float64 gives the same numbers with the same code path for linear and conv layers.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..numerics.layout import transposed_from_rows, transposed_rows

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _to_int32(acc: torch.Tensor, what: str) -> torch.Tensor:
    if acc.numel() and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise OverflowError(f"{what}: the int32 accumulator overflows (values up to {acc.abs().max():.3g})")
    return acc.to(torch.int32)


def int_linear(qx: torch.Tensor, zx: int, qw: torch.Tensor, zw: torch.Tensor, bias_q=None) -> torch.Tensor:
    """``Σ_k (qx − zx)(qw − zw) + bias_q`` as int32; ``qw`` is ``[out, in]``, ``zw`` per output channel."""
    x = qx.to(torch.float64) - float(zx)
    w = qw.to(torch.float64) - zw.to(torch.float64).reshape(-1, 1)
    acc = F.linear(x, w, None if bias_q is None else bias_q.to(torch.float64))
    return _to_int32(acc, "int_linear")


def int_conv(qx: torch.Tensor, zx: int, qw: torch.Tensor, zw: torch.Tensor, bias_q=None, *, stride=1, padding=0,
             dilation=1, groups=1) -> torch.Tensor:
    """A 1-d, 2-d or 3-d convolution on integers (``qw`` is ``[out, in/groups, *kernel]``).

    Zero padding pads ``qx − zx`` with 0, i.e. ``qx`` with its zero point: the real value 0, as
    the simulated model pads its (fake-quantized) float input.
    """
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[qw.dim()]
    x = qx.to(torch.float64) - float(zx)
    w = qw.to(torch.float64) - zw.to(torch.float64).reshape(-1, *([1] * (qw.dim() - 1)))
    b = None if bias_q is None else bias_q.to(torch.float64)
    return _to_int32(conv(x, w, b, stride, padding, dilation, groups), "int_conv")


def int_conv_transpose(qx: torch.Tensor, zx: int, qw: torch.Tensor, zw: torch.Tensor, bias_q=None, *, stride=1,
                       padding=0, output_padding=0, dilation=1, groups=1) -> torch.Tensor:
    """A 1-d or 2-d transposed convolution on integers (``qw`` is ``[in, out/groups, *kernel]``,
    ``zw`` per output channel); exact in float64 as :func:`int_conv`."""
    conv = {3: F.conv_transpose1d, 4: F.conv_transpose2d}[qw.dim()]
    x = qx.to(torch.float64) - float(zx)
    rows = transposed_rows(qw.to(torch.float64), groups) - zw.to(torch.float64).reshape(-1, 1)
    w = transposed_from_rows(rows, tuple(qw.shape), groups)
    b = None if bias_q is None else bias_q.to(torch.float64)
    return _to_int32(conv(x, w, b, stride, padding, output_padding, groups, dilation), "int_conv_transpose")


def int_max_pool(qx: torch.Tensor, pool) -> torch.Tensor:
    """Max pooling on integers (exact in float64; max commutes with any monotone grid)."""
    return pool(qx.to(torch.float64)).to(qx.dtype)


def _adaptive_counts(sizes: tuple, outputs: tuple) -> torch.Tensor:
    """Window sizes of adaptive pooling: output ``i`` of ``L → O`` spans ``[⌊iL/O⌋, ⌈(i+1)L/O⌉)``."""
    counts = torch.ones((), dtype=torch.int64)
    for length, out in zip(sizes, outputs):
        i = torch.arange(out)
        per_dim = -((-(i + 1) * length) // out) - (i * length) // out
        counts = counts.unsqueeze(-1) * per_dim
    return counts


def int_avg_pool_sums(qx: torch.Tensor, pool) -> tuple[torch.Tensor, torch.Tensor]:
    """Window sums of integers (``qx``, zero point already subtracted) and the divisor of each
    output position, for torch's average-pooling module ``pool`` (1-d or 2-d, adaptive or not).

    The sums are exact (float64 holds every integer below 2^53); the divisors follow the
    module's ``count_include_pad`` / ``ceil_mode`` rules, so ``sums / counts`` is its output.
    """
    x = qx.to(torch.float64)
    spatial = 1 if type(pool).__name__.endswith("1d") else 2
    if hasattr(pool, "output_size"):  # adaptive: mean × window size recovers the sum exactly
        size = pool.output_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * spatial
        size = tuple(x.shape[-spatial + i] if s is None else s for i, s in enumerate(size))
        counts = _adaptive_counts(tuple(x.shape[-spatial:]), size)
        sums = torch.round(pool(x) * counts.to(torch.float64))
    else:
        geometry = dict(kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                        ceil_mode=pool.ceil_mode, count_include_pad=pool.count_include_pad)
        if spatial == 1:  # avg_pool1d has no divisor_override: go through 2-d with a unit height
            geometry.update({k: (int(k != "padding"), geometry[k][0]) for k in ("kernel_size", "stride", "padding")})

        def window_sums(t: torch.Tensor) -> torch.Tensor:
            t = t.unsqueeze(-2) if spatial == 1 else t
            s = F.avg_pool2d(t, divisor_override=1, **geometry)
            return s.squeeze(-2) if spatial == 1 else s

        sums = window_sums(x)
        ones = torch.ones((1, 1, *x.shape[-spatial:]), dtype=torch.float64)
        # pool(ones) = (elements of the window inside the input) / divisor
        counts = torch.round(window_sums(ones) / pool(ones)).to(torch.int64)[0, 0]
    return _to_int32(sums, "int_avg_pool"), counts

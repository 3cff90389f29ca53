"""Integer-only rescaling (Jacob et al., CVPR 2018, section 2.2).

An int32 accumulator of ``s_x·s_w``-scaled products is brought to the output scale ``s_y`` by
the real multiplier ``M = s_x·s_w / s_y``, stored as an int32 ``m0`` in ``[2^30, 2^31)`` and a
shift with ``M ≈ m0 · 2^(−shift)``. Applying it needs only integer operations:

1. ``SaturatingRoundingDoublingHighMul(acc, m0)`` = ``round(acc · m0 / 2^31)`` (ties toward
   +∞, saturating the one overflowing case ``INT32_MIN · INT32_MIN``), as in gemmlowp;
2. a rounding right shift by ``shift − 31`` (ties away from zero); when ``shift < 31`` (M ≥ 1)
   the accumulator is instead shifted left by ``31 − shift`` first, saturating to int32;
3. add the output zero point and clamp to ``[qmin, qmax]``.
"""
from __future__ import annotations

import math

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_MAX_SHIFT = 62  # an int32 shifted right by more than 62 bits is 0 either way


def fixed_point_multiplier(real: float) -> tuple[int, int]:
    """``(m0, shift)`` with ``m0`` in ``[2^30, 2^31)`` and ``real ≈ m0 · 2^(−shift)``.

    The relative error is at most ``2^-31``. ``real = 0`` gives ``(0, 31)``; negative or
    non-finite values and values ``≥ 2^31`` (no int32 left shift could hold them) are rejected.

    >>> fixed_point_multiplier(0.25)
    (1073741824, 32)
    """
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"fixed_point_multiplier needs a finite real >= 0, got {real}")
    if real == 0:
        return 0, 31
    mantissa, exponent = math.frexp(real)  # real = mantissa · 2^exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * 2**31)  # exact: a double's 53-bit mantissa scaled by a power of two
    if m0 == 2**31:  # the mantissa rounded up to 1.0
        m0, exponent = 2**30, exponent + 1
    shift = 31 - exponent
    if shift < 0:
        raise ValueError(f"multiplier {real} is too large for an int32 fixed-point multiplier (>= 2^31)")
    return int(m0), int(shift)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b) -> torch.Tensor:
    """gemmlowp's SRDHM: ``round(a·b / 2^31)`` for int32 ``a``, ``b``, ties toward +∞.

    ``INT32_MIN · INT32_MIN`` (whose result does not fit) saturates to ``INT32_MAX``.
    """
    a64 = torch.as_tensor(a).to(torch.int64)
    b64 = torch.as_tensor(b).to(torch.int64)
    ab = a64 * b64  # |ab| <= 2^62: exact in int64
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return torch.where(overflow, torch.tensor(INT32_MAX), high)


def rounding_right_shift(x: torch.Tensor, exponent, ties: str = "away") -> torch.Tensor:
    """``x / 2^exponent`` rounded to the nearest integer; an exact half rounds away from zero
    (``ties="away"``, gemmlowp's RoundingDivideByPOT) or to the even neighbour (``ties="even"``,
    as ``torch.round`` and ONNX Runtime's float requantization do)."""
    x = torch.as_tensor(x).to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64).clamp(0, _MAX_SHIFT)
    if (torch.as_tensor(exponent) < 0).any():
        raise ValueError("rounding_right_shift needs exponent >= 0")
    half = torch.where(e > 0, torch.bitwise_left_shift(torch.ones_like(e), e - 1), torch.zeros_like(e))
    if ties == "even":
        floor = torch.bitwise_right_shift(x, e)  # arithmetic shift: rounds toward −∞
        rest = x - torch.bitwise_left_shift(floor, e)  # in [0, 2^e)
        up = (rest > half) | ((rest == half) & (half > 0) & (floor % 2 == 1))
        return floor + up.to(torch.int64)
    if ties != "away":
        raise ValueError(f"rounding_right_shift: ties must be 'away' or 'even', got {ties!r}")
    magnitude = torch.bitwise_right_shift(x.abs() + half, e)
    return torch.where(x < 0, -magnitude, magnitude)


def requantize(acc_int32: torch.Tensor, m0, shift, zero_point, qmin: int, qmax: int, *,
               single_rounding: bool = False, ties: str = "away") -> torch.Tensor:
    """Integer-only ``clamp(round(acc · m0 · 2^(−shift)) + zero_point, qmin, qmax)``.

    ``m0``, ``shift`` and ``zero_point`` are ints or integer tensors broadcastable to
    ``acc_int32`` (per-channel multipliers: shape them to broadcast along the channel axis).
    Returns int32.

    By default the gemmlowp / TFLite sequence: a saturating left shift, SRDHM (rounds to
    ``2^-31·m0`` precision), then a rounding right shift — two roundings, so a product within
    about ``2^(31−shift)`` of a half rounds the wrong way (measured: 1.4% of the outputs of a
    MobileNetV2 depthwise layer, always upward). ``single_rounding=True`` forms ``acc · m0``
    exactly in 64 bits and rounds once (half away from zero), as TFLite's
    ``TFLITE_SINGLE_ROUNDING`` and CMSIS-NN do; with it, ``ties="even"`` rounds an exact half
    to the even level instead (as the simulation's ``torch.round`` and ONNX Runtime's QLinear*
    ops: they meet exact halves whenever the multiplier is a power of two, e.g. averaging 4
    values on one grid).
    """
    acc = torch.as_tensor(acc_int32)
    if acc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"requantize expects an integer accumulator, got {acc.dtype}")
    acc = acc.to(torch.int64)
    if ((acc < INT32_MIN) | (acc > INT32_MAX)).any():
        raise ValueError("requantize: accumulator values exceed int32")
    m0 = torch.as_tensor(m0, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    if ((m0 < 0) | (m0 > INT32_MAX)).any():
        raise ValueError("requantize: m0 must lie in [0, 2^31)")
    if (shift < 0).any():
        raise ValueError("requantize: shift must be >= 0")
    if ties != "away" and not single_rounding:
        raise ValueError("requantize: ties='even' needs single_rounding=True")
    if single_rounding:  # |acc · m0| < 2^62: exact in int64
        out = rounding_right_shift(acc * m0, shift, ties)
        out = torch.where(shift > _MAX_SHIFT, torch.zeros_like(out), out)  # |acc·m0| / 2^63 < 1/2
    else:
        left = (31 - shift).clamp(min=0)
        acc = torch.bitwise_left_shift(acc, left).clamp(INT32_MIN, INT32_MAX)
        high = saturating_rounding_doubling_high_mul(acc, m0)
        out = rounding_right_shift(high, (shift - 31).clamp(min=0))
    out = out + torch.as_tensor(zero_point, dtype=torch.int64)
    return out.clamp(qmin, qmax).to(torch.int32)

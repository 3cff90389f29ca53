"""The pure numerics core: stateless functions of tensors and specs (torch and numpy only)."""
from .affine import choose_qparams, dequantize, fake_quantize, quantize, storage_dtype
from .fixed_point import (
    fixed_point_multiplier,
    requantize,
    rounding_right_shift,
    saturating_rounding_doubling_high_mul,
)
from .layout import expand, from_rows, qparam_shape, to_rows
from .packing import pack, packed_nbytes, unpack

__all__ = [
    "choose_qparams", "quantize", "dequantize", "fake_quantize", "storage_dtype",
    "fixed_point_multiplier", "requantize", "rounding_right_shift",
    "saturating_rounding_doubling_high_mul",
    "expand", "from_rows", "qparam_shape", "to_rows",
    "pack", "unpack", "packed_nbytes",
]

"""Reference integer kernels: plain PyTorch, exact, slow. Fast paths are checked against them.

Beside the int8 GEMM references: shift-and-add products for power-of-two / APoT weights
(:mod:`.shift`) and bit-packed XNOR–popcount products for binary layers (:mod:`.xnor`).
"""
from .reference import int_conv, int_linear, int_max_pool
from .shift import shift_add_matmul, shift_linear, shift_weights
from .xnor import pack_signs, sign_matmul, xnor_linear, xnor_matmul

__all__ = ["int_linear", "int_conv", "int_max_pool", "shift_add_matmul", "shift_linear", "shift_weights",
           "pack_signs", "sign_matmul", "xnor_linear", "xnor_matmul"]

"""Reference integer kernels: plain PyTorch, exact, slow. Fast paths are checked against them."""
from .reference import int_conv, int_linear, int_max_pool

__all__ = ["int_linear", "int_conv", "int_max_pool"]

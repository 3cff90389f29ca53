"""Leaving fewbits: the packed model file (and, with the deploy work, ONNX)."""
from .packed import PackedFile, ideal_bytes, load, save

__all__ = ["save", "load", "PackedFile", "ideal_bytes"]

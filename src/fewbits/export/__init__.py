"""Leaving fewbits: the packed model file and the QDQ ONNX model."""
from .onnx import ExportResult, OnnxModel, Verification, export_onnx, int8_kernel_profile, verify
from .packed import PackedFile, ideal_bytes, load, save

__all__ = ["save", "load", "PackedFile", "ideal_bytes", "export_onnx", "verify", "ExportResult", "Verification",
           "OnnxModel", "int8_kernel_profile"]

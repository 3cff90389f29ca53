"""Lowering: a calibrated model → one frozen record per layer and op on a deployment target.

Every artefact (the integer model, the ONNX file, the packed file, the size report) is built
from these records; :func:`deployed_kind` is the one rule for what a layer becomes.
"""
from .kinds import INTEGER_KINDS, Kind, deployed_kind, op_kind
from .lower import integer_weight, lower, lower_layer, u8_shift
from .records import FloatRecord, Grid, LayerRecord, Lowering, OpRecord, record_summaries

__all__ = ["lower", "lower_layer", "integer_weight", "u8_shift", "deployed_kind", "op_kind", "Kind", "INTEGER_KINDS",
           "Grid", "LayerRecord", "OpRecord", "FloatRecord", "Lowering", "record_summaries"]

"""What ONNX Runtime actually runs: the weight GEMMs of its optimized graph, integer or float.

A QDQ layer fuses into an integer kernel only when ONNX Runtime finds the whole pattern (for a
convolution that includes a quantized output); otherwise it dequantizes the weight and runs the
product in float. :func:`kernel_report` reads the optimized graph back, so the exporter can say
how many weight GEMMs run on integers and warn when a quantized layer did not fuse.
"""
from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# ONNX Runtime's products (contrib ops included), integer and float, and which of their inputs
# is the second factor: a product is a weight GEMM when that factor is a constant
INTEGER_GEMMS = {"QLinearConv": (3,), "QGemm": (3,), "QLinearMatMul": (3,), "MatMulInteger": (1,),
                 "MatMulIntegerToFloat": (1,), "ConvInteger": (1,), "DynamicQuantizeMatMul": (1,), "MatMulNBits": (1,),
                 "QAttention": (1,), "QLinearConvTranspose": (3,)}
FLOAT_GEMMS = {"Conv": (1,), "ConvTranspose": (1,), "FusedConv": (1,), "NchwcConv": (1,), "Gemm": (0, 1),
               "FusedGemm": (0, 1), "MatMul": (0, 1), "FusedMatMul": (0, 1), "TransposeMatMul": (0, 1)}


@dataclass
class KernelReport:
    """The weight GEMMs (products with a constant operand) of ONNX Runtime's optimized graph."""

    integer: int
    float: int
    float_nodes: list = field(default_factory=list)  # the float ones, by node name
    ops: dict = field(default_factory=dict)  # every op type of the optimized graph, counted
    unfused: dict = field(default_factory=dict)  # float node → the watched layer it was written for

    @property
    def share(self) -> float:
        """Share of weight GEMMs on integer kernels (1.0 for a graph without any)."""
        total = self.integer + self.float
        return self.integer / total if total else 1.0

    def describe(self) -> str:
        return f"{self.integer}/{self.integer + self.float} weight GEMMs on integer kernels ({self.share:.0%})"

    def to_dict(self) -> dict:
        return {"integer": self.integer, "float": self.float, "share": round(self.share, 4),
                "float_nodes": self.float_nodes, "unfused_layers": sorted(set(self.unfused.values())), "ops": self.ops}


def _constant_inputs(graph) -> set[str]:
    """Tensors that are constants: initializers, Constant outputs, and what DequantizeLinear,
    Transpose, Reshape or Cast make of them."""
    constant = {i.name for i in graph.initializer}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type == "Constant" or (node.op_type in ("DequantizeLinear", "Transpose", "Reshape", "Cast")
                                              and node.input and node.input[0] in constant):
                for out in node.output:
                    if out not in constant:
                        constant.add(out)
                        changed = True
    return constant


def kernel_report(path, watch: dict | None = None, threads: int = 1) -> KernelReport:
    """Open ``path`` in ONNX Runtime (all graph optimizations, as at inference), save the optimized
    graph and count its weight GEMMs: a product counts when a factor is a constant (a weight; a
    product of two activations, like attention scores, is not counted).
    ``watch``: node name → layer for the GEMMs written as integer layers; those still float in
    the optimized graph (ONNX Runtime keeps an unfused node's name) are ``unfused``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the NCHWc warning about hardware-specific files is expected
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
    constant = _constant_inputs(graph)
    integer, floats = 0, []
    for node in graph.node:
        factors = INTEGER_GEMMS.get(node.op_type) or FLOAT_GEMMS.get(node.op_type)
        if factors is None or not any(i < len(node.input) and node.input[i] in constant for i in factors):
            continue  # not a product, or a product of two activations (attention scores)
        if node.op_type in INTEGER_GEMMS:
            integer += 1
        else:
            floats.append(node.name or node.op_type)
    ops = collections.Counter(n.op_type for n in graph.node)
    watch = watch or {}
    # a node ORT fused keeps its name inside the new one: "fused node_linear" (an activation taken
    # in), "node_matmul/MatMulAddFusion" (a MatMul and Add made a Gemm), or both
    origin = {n: n.rpartition(" ")[2].partition("/")[0] for n in floats}
    unfused = {n: watch[o] for n, o in origin.items() if o in watch}
    return KernelReport(integer, len(floats), floats, dict(sorted(ops.items())), unfused)

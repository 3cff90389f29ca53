"""The small ONNX graphs and sessions the latency table times: a layer's conversions, an empty
call, the reference graph, one session per file (threads fixed, spinning off)."""
from __future__ import annotations

from pathlib import Path

import torch


def _session(path: str, threads: int):
    from ..export.onnx import OnnxModel

    return OnnxModel(path, threads=threads)


def onnx_model(graph):
    """A hand-built graph (conversions, the empty call, the reference, layout nodes) as an
    opset-21 model that may use ONNX Runtime's blocked-layout ops."""
    from onnx import helper

    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft.nchwc", 1)])


def _save_graph(graph, path: Path) -> None:
    import onnx

    onnx.save(onnx_model(graph), str(path))


def _conversion_graphs(shape_in: tuple, shape_out: tuple, tmp: Path, tag: str) -> tuple[str, str, str]:
    """``QuantizeLinear`` of the input and of the output to uint8, ``DequantizeLinear`` of a uint8 output."""
    from onnx import TensorProto, helper

    def graph(name, op, shape_, dtype_in, dtype_out) -> str:
        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
        zp = helper.make_tensor("z", TensorProto.UINT8, [], [128])
        node = helper.make_node(op, ["x", "s", "z"], ["y"])
        g = helper.make_graph([node], name, [helper.make_tensor_value_info("x", dtype_in, list(shape_))],
                              [helper.make_tensor_value_info("y", dtype_out, list(shape_))], [scale, zp])
        path = tmp / f"{tag}-{name}.onnx"
        _save_graph(g, path)
        return str(path)

    return (graph("q", "QuantizeLinear", shape_in, TensorProto.FLOAT, TensorProto.UINT8),
            graph("qo", "QuantizeLinear", shape_out, TensorProto.FLOAT, TensorProto.UINT8),
            graph("dq", "DequantizeLinear", shape_out, TensorProto.UINT8, TensorProto.FLOAT))


def _empty_run_seconds(tmp: Path, threads: int) -> float:
    """What calling a session costs with no work in it (an Identity on one value)."""
    from ..export.timing import interleaved_medians

    return interleaved_medians({"empty": _empty_runner(tmp, threads)}, seconds_per_engine=0.5)["empty"]["median_s"]


def _empty_runner(tmp: Path, threads: int):
    import numpy as np
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp / "empty.onnx"
    _save_graph(g, path)
    s = _session(str(path), threads)
    feed = {"x": np.zeros(1, np.float32)}
    return lambda: s.run(feed)


def _reference_runner(tmp: Path, threads: int):
    """The reference graph (``REFERENCE``) as a zero-argument call."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "reference", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 256])], [w])
    path = tmp / "reference.onnx"
    _save_graph(g, path)
    return _runner(str(path), threads, torch.randn(32, 256, generator=torch.Generator().manual_seed(0)))


def _runner(path: str, threads: int, x: torch.Tensor):
    return _array_runner(path, threads, x.numpy())


def _array_runner(path: str, threads: int, x):
    s = _session(path, threads)
    feed = {s.inputs[0]: x}
    return lambda: s.run(feed)

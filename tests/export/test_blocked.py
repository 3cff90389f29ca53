"""Per-group weights in ONNX: int4 initializers behind a blocked DequantizeLinear (opset 21),
fused by ONNX Runtime into its 4-bit kernel (MatMulNBits), partial last groups included."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fewbits
from fewbits.export.onnx import export_onnx
from fewbits.export.qdq import pack_int4_initializers
from fewbits.export.verify import OnnxModel
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.spec import PerGroup, QuantSpec


def _recipe(bits: int, symmetric: bool, group: int = 32) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, symmetric=symmetric,
                                                      granularity=PerGroup(group, axis=1))))
    return Recipe("groups", (("Linear", layer), ("Conv2d", layer), ("Embedding", layer)))


def _exact(path) -> OnnxModel:
    """The file computed in float, as the simulated model does (ONNX Runtime's 4-bit kernel by
    default quantizes its activations to int8 per block)."""
    return OnnxModel(path, exact_4bit=True)


@pytest.mark.parametrize("shape", [(8,), (2, 5)])  # 2-d inputs (a classifier), 3-d (tokens)
def test_group_weights_are_int4_and_fuse_into_the_4_bit_kernel(tmp_path, shape):
    torch.manual_seed(0)
    # 200 and 300 inputs: the last group of 128 is partial; 64 inputs: one group shorter than 128
    model = nn.Sequential(nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10)).eval()
    batches = [torch.randn(*shape, 200) for _ in range(3)]
    q = fewbits.prepare(model, "w4-g128")
    assert q.left_float == []
    fewbits.calibrate(q, batches)
    result = export_onnx(q, batches[0], tmp_path / "g.onnx", batches=batches, strict=True)
    assert result.opset == 21 and result.counts() == {"weight-only": 3}
    # every product is ONNX Runtime's 4-bit kernel, none left in float
    assert result.kernels.ops.get("MatMulNBits") == 3 and result.kernels.float == 0, result.kernels.ops
    saved = onnx.load(result.path)
    int4 = sorted(tuple(i.dims) for i in saved.graph.initializer if i.data_type == TensorProto.INT4)
    assert int4 == [(64, 300), (200, 64), (300, 10)]  # [in, out]: the MatMul's second factor
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert result.bytes < 0.3 * fp32_bytes, (result.bytes, fp32_bytes)
    assert result.verification.ok and result.verification.max_abs < 1e-5, result.verification.summary()
    with torch.no_grad():
        expected = q(batches[1])
    # float32 products in another order: a few ulps of outputs of order 1
    assert torch.allclose(_exact(result.path)(batches[1]), expected, atol=1e-5)
    # ONNX Runtime's default: int8 activations per block of 128 — within a few 8-bit steps of the output range
    step = float(expected.max() - expected.min()) / 255
    assert float((OnnxModel(result.path)(batches[1]) - expected).abs().max()) < 4 * step


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True), (2, False)])
def test_convolutions_and_embeddings_with_group_weights_compute_the_simulated_model(tmp_path, bits, symmetric):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 40)
            self.c1 = nn.Conv2d(40, 24, 1)
            self.c3 = nn.Conv2d(24, 16, 3, padding=1)  # groups along in·kh·kw = 216: the last of 32 partial
            self.lin = nn.Linear(16, 10)

        def forward(self, ids):
            x = self.emb(ids).transpose(1, 2).reshape(-1, 40, 4, 4)
            x = torch.relu(self.c3(torch.relu(self.c1(x))))
            return self.lin(x.mean((2, 3)))

    torch.manual_seed(1)
    model = Net().eval()
    batches = [torch.randint(0, 50, (2, 16)) for _ in range(3)]
    q = fewbits.prepare(model, _recipe(bits, symmetric))
    fewbits.calibrate(q, batches)
    result = export_onnx(q, batches[0], tmp_path / "n.onnx", batches=batches, strict=True)
    assert result.counts() == {"weight-only": 4}
    saved = onnx.load(result.path)
    packed = [i for i in saved.graph.initializer if i.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    # the three GEMM weights in 4 bits (and their zero points when asymmetric); the table's rows
    # are gathered in int8
    assert len(packed) == (3 if symmetric else 6)
    with torch.no_grad():
        expected = q(batches[1])
    assert torch.allclose(_exact(result.path)(batches[1]), expected, atol=1e-5)  # float32 op order


def test_int4_packing_round_trips_and_refuses_wider_values():
    values = np.array([[-8, 7, 0], [3, -1, 5]], dtype=np.int8)  # odd count: a padded last byte
    graph = helper.make_graph([helper.make_node("Cast", ["q"], ["q4"], to=TensorProto.INT4),
                               helper.make_node("Identity", ["q4"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.INT4, [2, 3])],
                              [numpy_helper.from_array(values, "q")])
    model = helper.make_model(graph)
    assert pack_int4_initializers(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Identity"]
    (init,) = model.graph.initializer
    assert init.name == "q4" and init.data_type == TensorProto.INT4 and len(init.raw_data) == 3
    assert np.array_equal(numpy_helper.to_array(init), values)
    bad = helper.make_model(helper.make_graph([helper.make_node("Cast", ["w"], ["w4"], to=TensorProto.INT4)], "g", [],
                                              [helper.make_tensor_value_info("w4", TensorProto.INT4, [1])],
                                              [numpy_helper.from_array(np.array([9], dtype=np.int8), "w")]))
    with pytest.raises(ValueError, match=r"initializer 'w' holds values outside 4 bits \[9, 9\]"):
        pack_int4_initializers(bad)


def test_strict_export_refuses_group_weights_the_runtime_did_not_fuse(tmp_path, monkeypatch):
    """With ONNX Runtime's graph optimizations off (as an older runtime without the 4-bit fusion
    would), the blocked DequantizeLinear + MatMul stays float: strict raises naming the layers,
    otherwise it warns."""
    import onnxruntime as ort

    class Unoptimized(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(2, 5, 64)]
    q = fewbits.prepare(model, "w4-g32")
    fewbits.calibrate(q, batches)
    monkeypatch.setattr(ort, "SessionOptions", Unoptimized)
    with pytest.raises(ValueError, match=r"2 layer\(s\) did not fuse into ONNX Runtime's integer kernels .*\['0', '2'\]"):
        export_onnx(q, batches[0], tmp_path / "s.onnx", verify=False, strict=True)
    with pytest.warns(UserWarning, match=r"2 integer layer\(s\) did not fuse"):
        export_onnx(q, batches[0], tmp_path / "w.onnx", verify=False)

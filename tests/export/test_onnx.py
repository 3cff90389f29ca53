"""QDQ ONNX export: ONNX Runtime runs it on integer kernels and matches the integer model."""
import collections
import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

import fewbits  # noqa: E402
from fewbits.export.onnx import (OnnxModel, int8_kernel_profile, pair_sum_bound, plan_layers,  # noqa: E402
                                 export_onnx)
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe  # noqa: E402
from fewbits.spec import PerChannel, QuantSpec  # noqa: E402

SATURATING = int8_kernel_profile().pair_saturation


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU6(), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def _batches(n=3, seed=1, shape=(16, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 2 for _ in range(n)]


def _calibrated(model, recipe="w8a8", batches=None):
    q = fewbits.prepare(model, recipe)
    return fewbits.calibrate(q, batches or _batches())


def _ort_ops(path, tmp_path):
    OnnxModel(path, optimized_path=tmp_path / "optimized.onnx")
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


# ---- the CPU profile and the bound -----------------------------------------------------------
def test_profile_from_cpu_flags():
    assert int8_kernel_profile({"avx2", "fma"}, "x86_64").pair_saturation
    assert int8_kernel_profile({"avx2", "avx512bw"}, "x86_64").isa == "avx512bw"
    assert not int8_kernel_profile({"avx2", "avx512bw", "avx512_vnni"}, "x86_64").pair_saturation
    assert not int8_kernel_profile({"avx2", "avx_vnni"}, "x86_64").pair_saturation
    assert not int8_kernel_profile(set(), "aarch64").pair_saturation


def test_pair_sum_bound_closed_form():
    w = torch.tensor([[100, 30, -5, -120], [64, 64, -64, -64]], dtype=torch.int8)
    # worst pairs: 100 + 64 is not in one row; per row: (100+30, -(120+5)) and (128, -128)
    assert pair_sum_bound(w, 255) == (-255 * 128, 255 * 130)
    assert pair_sum_bound(w[1:], 255) == (-32640, 32640)  # within int16: provably exact


# ---- export + parity on a small CNN ----------------------------------------------------------
def test_cnn_exports_to_integer_kernels_and_matches_the_integer_model(tmp_path):
    q = _calibrated(_cnn())
    result = export_onnx(q, _batches(1)[0], tmp_path / "cnn.onnx", batches=_batches(3, seed=7))
    v = result.verification
    # same integer inputs everywhere; a one-level flip is allowed where ORT's float32 rescale
    # and the 31-bit fixed-point multiplier round a near-half value differently
    assert v.ok and v.max_levels <= 1 and v.differing <= 1e-3, v.summary()
    assert v.layers == 4
    # outputs: the last layer dequantizes; float32 products vs the exact int32 sum
    assert v.max_abs < 1e-4, v.summary()
    assert result.counts() == {"int8": 4}
    ops = _ort_ops(result.path, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2, ops  # ORT runs every layer on integers
    assert (result.kernels.integer, result.kernels.float, result.kernels.share) == (4, 0, 1.0)  # and says so
    meta = json.loads({p.key: p.value for p in onnx.load(result.path).metadata_props}["fewbits"])
    assert meta["format"] == "fewbits.onnx" and len(meta["layers"]) == 4
    assert {i.name for i in onnx.load(result.path).graph.input} == {"input"}
    # dynamic batch: another batch size runs
    out = OnnxModel(result.path)(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 5)


def test_depthwise_layers_keep_8_bit_weights_and_the_rest_narrow_on_avx2():
    q = _calibrated(_cnn())
    plan = {e.name: e for e in plan_layers(q, int8_kernel_profile({"avx2"}, "x86_64"))}
    assert plan["4"].weight_bits == 8 and plan["4"].narrowed_from is None  # depthwise: int32 sums
    assert plan["0"].weight_bits == 7 and plan["0"].narrowed_from == 8
    assert "beyond int16" in plan["0"].reason
    vnni = {e.name: e for e in plan_layers(q, int8_kernel_profile({"avx2", "avx512_vnni"}, "x86_64"))}
    assert all(e.weight_bits == 8 and e.narrowed_from is None for e in vnni.values())
    assert q.quantized_layers()["0"].weight_quantizer.spec.bits == 8  # planning changed nothing


def _wide_linear():
    """A linear layer whose u8 inputs sit near the top level and weights use the full int8 range:
    on AVX2 without VNNI, pairs of u8·s8 products overflow int16."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.sign(torch.randn(16, 64)) * torch.empty(16, 64).uniform_(0.8, 1.0))
    batches = [torch.rand(32, 64) * 0.2 + 0.8 for _ in range(2)]
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(16, 4)).eval(), batches


@pytest.mark.skipif(not SATURATING, reason="this CPU's int8 kernels do not saturate (VNNI or not x86)")
def test_full_range_weights_saturate_here_and_auto_avoids_it(tmp_path):
    model, batches = _wide_linear()
    q = _calibrated(model, batches=batches)
    full = export_onnx(q, batches[0], tmp_path / "full.onnx", batches=batches, weights="full", verify=False)
    v_full = fewbits.verify(q, full.path, batches)
    assert v_full.max_levels > 10 and not v_full.ok, v_full.summary()  # saturation, not rounding
    with pytest.raises(ValueError, match="differs from the integer model"):
        export_onnx(q, batches[0], tmp_path / "strict.onnx", batches=batches, weights="full", strict=True)
    auto = export_onnx(q, batches[0], tmp_path / "auto.onnx", batches=batches)
    assert auto.verification.ok and auto.verification.max_levels <= 1, auto.verification.summary()
    assert [e.narrowed_from for e in auto.layers] == [8, 8]


def test_signed_activation_grid_exports_as_uint8(tmp_path):
    signed = TensorRecipe(QuantSpec(bits=8, signed=True, symmetric=True), "minmax")
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=8, granularity=PerChannel(0))), input=signed)
    recipe = Recipe("w8a8-signed", (("Linear", layer), ("Conv2d", layer)))
    q = _calibrated(_cnn(), recipe)
    # the numbers are right, but ONNX Runtime fuses none of the layers after a ReLU here: a ReLU
    # before a quantize whose zero point is not the lowest level (128) stays a separate node, so
    # the GEMM before it has no quantized output; the exporter says so
    with pytest.warns(UserWarning, match=r"did not fuse"):
        result = export_onnx(q, _batches(1)[0], tmp_path / "s.onnx", batches=_batches(2, seed=4))
    assert result.kernels.integer < 4
    assert result.verification.ok and result.verification.max_levels <= 1, result.verification.summary()
    zero_points = [i for i in onnx.load(result.path).graph.initializer if i.data_type == onnx.TensorProto.INT8
                   and not i.dims]
    assert zero_points == []  # activation zero points are uint8 (128), none signed


def test_smoothed_layers_divide_before_quantizing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(64, 16) * torch.linspace(0.1, 8, 16) for _ in range(3)]
    q = fewbits.prepare(model, "w8a8-smoothquant")
    fewbits.calibrate(q, batches)
    assert any(m.smooth_scale is not None for m in q.quantized_layers().values())
    result = export_onnx(q, batches[0], tmp_path / "sq.onnx", batches=batches)
    assert result.verification.ok and result.verification.max_levels <= 1, result.verification.summary()
    assert result.verification.max_abs < 1e-3


@pytest.mark.parametrize("recipe, mode", [("w8", "weight-only"), ("w4-kmeans", "decoded")])
def test_layers_without_integer_kernels_export_as_what_they_compute(tmp_path, recipe, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    batches = [torch.randn(8, 128) for _ in range(2)]
    q = _calibrated(model, recipe, batches)
    result = export_onnx(q, batches[0], tmp_path / "m.onnx", batches=batches)
    modes = [e.mode for e in result.layers]
    assert modes[0] == mode and all(e.reason or e.mode == "weight-only" for e in result.layers)
    with torch.no_grad():
        expected = q(batches[1])
    # the file computes the simulated model; float32 op order differs
    assert torch.allclose(OnnxModel(result.path)(batches[1]), expected, atol=1e-4, rtol=1e-4)


def test_dynamic_inputs_export_as_dynamic_quantize_linear(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    batches = [torch.randn(4, 16, 64) * 3 for _ in range(3)]  # 3-D: ONNX MatMul, as in transformers
    q = _calibrated(model, "w8a8-dynamic", batches)
    result = export_onnx(q, batches[0], tmp_path / "dyn.onnx", batches=batches, weights="narrow")
    assert [e.mode for e in result.layers] == ["int8-dynamic", "int8-dynamic"]
    ops = _ort_ops(result.path, tmp_path)
    assert ops["DynamicQuantizeLinear"] >= 1 or ops["DynamicQuantizeMatMul"] >= 1, ops
    assert "MatMul" not in ops and "Gemm" not in ops, ops  # every product runs on integers
    # same per-batch grid (ONNX's formula is choose_qparams'); x/s against x·(1/s) can move a
    # value sitting on a half level by one step, which shows as < 1e-3 of the output range
    assert result.verification.max_steps < 0.5 and result.verification.mean_steps < 1e-3, result.verification.summary()


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_is_named(tmp_path):
    q = fewbits.prepare(_cnn(), "w8a8")
    with pytest.raises(ValueError, match="not calibrated"):
        export_onnx(q, _batches(1)[0], tmp_path / "x.onnx")
    fewbits.calibrate(q, _batches())
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(q, _batches(1)[0], tmp_path / "missing" / "x.onnx")
    with pytest.raises(ValueError, match="weights must be one of"):
        export_onnx(q, _batches(1)[0], tmp_path / "x.onnx", weights="8bit")
    with pytest.raises(ValueError, match="example_inputs"):
        export_onnx(q, "not a tensor", tmp_path / "x.onnx")
    symmetric = TensorRecipe(QuantSpec(bits=8, signed=True, symmetric=True), "minmax", dynamic=True)
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=8, granularity=PerChannel(0))), input=symmetric)
    dynamic = _calibrated(_cnn(), Recipe("sym-dynamic", (("Linear", layer), ("Conv2d", layer))))
    with pytest.raises(ValueError, match="layer '0' quantizes its input dynamically on a grid"):
        export_onnx(dynamic, _batches(1)[0], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="not written by fewbits"):
        fewbits.verify(q, foreign, _batches(1))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.onnx"):
        fewbits.verify(q, corrupt, _batches(1))
    other = _calibrated(nn.Sequential(nn.Linear(4, 4)).eval(), batches=[torch.randn(2, 4)])
    good = export_onnx(q, _batches(1)[0], tmp_path / "good.onnx", verify=False)
    with pytest.raises(ValueError, match="other quantized layers"):
        fewbits.verify(other, good.path, [torch.randn(2, 4)])


# ---- real tasks ------------------------------------------------------------------------------
def test_fashion_cnn_onnx_accuracy_equals_the_integer_model(tmp_path):
    from fewbits.tasks import load_task

    task = load_task("fashion-cnn", small=True)
    q = _calibrated(task.model, "w8a8", task.calibration)
    result = export_onnx(q, task.calibration[0], tmp_path / "fashion.onnx", batches=task.calibration[:2])
    assert result.verification.ok, result.verification.summary()
    assert result.counts() == {"int8": 5}
    ort_acc = task.evaluate(OnnxModel(result.path))[task.metric]
    from fewbits.export.plan import narrowing

    int_acc = task.evaluate(fewbits.convert(q, fewbits.Target.reference(weight_bits=narrowing(result.layers))))[task.metric]
    assert abs(ort_acc - int_acc) <= 0.2, (ort_acc, int_acc)  # a few images on rare one-level flips
    assert abs(ort_acc - task.evaluate(q)[task.metric]) <= 1.0  # 7-bit weights cost little here


@pytest.mark.slow
def test_minilm_exports_whole_and_matches(tmp_path):
    from fewbits.tasks import load_task

    task = load_task("minilm-wordnet", small=True)
    q = fewbits.prepare(task.model, "w8a8-smoothquant")
    fewbits.calibrate(q, task.calibration[:1])
    names = ("input_ids", "attention_mask", "token_type_ids")
    batch = {k: task.calibration[1][k] for k in names}
    result = export_onnx(q, batch, tmp_path / "minilm.onnx", batches=[batch])
    v = result.verification
    assert v.ok and v.layers >= 30, v.summary()
    assert result.inputs == list(names)
    assert result.counts()["int8"] == 37 and result.counts()["weight-only"] == 2  # word and position tables
    # int8 word and position tables and weights (22.5 MB, the pooler included: it is part of the
    # model here); scales, biases, SmoothQuant's divisors and the graph add ~0.3 MB (23.41 measured)
    assert result.bytes < 23_500_000
    ops = _ort_ops(result.path, tmp_path)
    assert ops["MatMulIntegerToFloat"] >= 36, ops


def test_recipe_capped_at_7_bits_exports_without_narrowing(tmp_path):
    from fewbits.recipe import get_recipe, with_weight_bits_at_most

    capped = with_weight_bits_at_most(get_recipe("w8a8"), 7)
    assert capped.name == "w8a8+w7"
    layers = dict(capped.by_type)
    assert layers["Linear"].weight.spec.bits == 7 and layers["Conv2d"].weight.spec.bits == 7
    assert layers["Embedding"].weight.spec.bits == 8  # a gather, not an int8 GEMM
    assert dict(with_weight_bits_at_most(get_recipe("w8"), 7).by_type)["Linear"].weight.spec.bits == 8  # weight-only
    assert dict(with_weight_bits_at_most(get_recipe("w4a8"), 7).by_type)["Linear"].weight.spec.bits == 4
    q = _calibrated(_cnn(), capped)
    result = export_onnx(q, _batches(1)[0], tmp_path / "c.onnx", batches=_batches(2),
                         profile=int8_kernel_profile({"avx2"}, "x86_64"))
    assert all(e.narrowed_from is None and e.weight_bits == 7 for e in result.layers)
    assert all("kept" in e.reason for e in result.layers)  # the pair bound holds: proven, not assumed
    assert result.verification.ok


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x))) + x
        return self.fc(torch.flatten(torch.relu(y), 1))


def test_the_exporter_reads_back_which_gemms_ort_runs_on_integers(tmp_path):
    torch.manual_seed(0)
    model = _Residual().eval()
    batches = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    q = _calibrated(model, "w8a8-inputs", batches)
    # conv2's output meets a float addition: no quantized output, so ORT cannot fuse it
    with pytest.warns(UserWarning, match=r"1 integer layer\(s\) did not fuse .*\['conv2'\]"):
        plain = export_onnx(q, batches[0], tmp_path / "plain.onnx", batches=batches)
    assert (plain.kernels.integer, plain.kernels.float) == (2, 1) and plain.kernels.share == pytest.approx(2 / 3)
    assert plain.to_dict()["kernels"]["unfused_layers"] == ["conv2"]
    adds = _calibrated(model, "w8a8", batches)  # the default quantizes the addition: every product fuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        result = export_onnx(adds, batches[0], tmp_path / "adds.onnx", batches=batches)
    assert (result.kernels.integer, result.kernels.float) == (3, 0) and result.kernels.share == 1.0


def test_verification_accepts_compounded_rounding_but_not_saturation():
    from fewbits.export.verify import Verification

    def v(max_levels, differing, max_steps):
        return Verification(max_levels, differing, "l", 18, max_steps, 0.0, 0.0, 2, 1.0, 1e-3)

    assert v(1, 5e-4, 0.5).ok  # one-level flips on a few values
    assert v(3, 8e-7, 1e-5).ok  # ResNet-18: flips grown along the residual chain, outputs equal
    assert not v(3, 5e-4, 1e-5).ok  # multi-level differences on too many values
    assert not v(3, 8e-7, 2.0).ok  # ... or outputs apart
    assert not v(70, 8e-7, 0.5).ok  # saturation: many levels
    assert not v(1, 2e-3, 0.5).ok  # too many values differ
